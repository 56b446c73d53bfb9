"""``rledit edit`` and ``rledit generate``: edit a model with one's own facts from a file, and look at the result.

    rledit edit --data facts.jsonl --out edited/ --save-pretrained merged/ --export-peft adapter/
    rledit generate --editor edited/ --prompt "The capital of France is" --compare

The facts file is in any record format :mod:`rledit.data` reads; rledit's own is one JSON object per fact
(``prompt``, ``target_new``, optional ``subject``, ``rephrase_prompts``, ``locality``).
"""

from __future__ import annotations

import argparse

DEFAULT_EDITORS = {("smollm2-135m", "rledit"): "smollm2-135m-zsre"}  # the shipped editor a model gets by default


def add_edit_parsers(sub: argparse._SubParsersAction) -> None:
    """Add the ``edit`` and ``generate`` subcommands to the ``rledit`` parser."""
    from rledit.cli import add_chat_template_flag

    edit = sub.add_parser("edit", help="apply your own facts from a file; save the edited model")
    edit.add_argument("--data", required=True, help="facts file (.json/.jsonl[.gz], any known record format)")
    edit.add_argument("--model", default="smollm2-135m", help="hub id, local folder or alias")
    edit.add_argument("--method", default="rledit", help="editing method")
    edit.add_argument("--checkpoint", default=None,
                      help="trained editor (name or folder); default: the shipped one for the model, if any")
    edit.add_argument("--step-size", type=int, default=None, help="edits per step (default: all in one step)")
    edit.add_argument("--out", required=True, help="folder for the rledit save (Editor.load reads it)")
    edit.add_argument("--save-pretrained", default=None, metavar="DIR",
                      help="also write a plain Hugging Face model with the edits merged")
    edit.add_argument("--export-peft", default=None, metavar="DIR", help="also write the edits as a peft LoRA adapter")
    edit.add_argument("--max-new-tokens", type=int, default=8, help="greedy tokens shown per edited prompt")
    add_chat_template_flag(edit)
    edit.set_defaults(handler=_edit)

    generate = sub.add_parser("generate", help="greedy text of an edited (or any) model")
    which = generate.add_mutually_exclusive_group(required=True)
    which.add_argument("--editor", help="a folder written by `rledit edit` or Editor.save")
    which.add_argument("--model", help="hub id, local folder or alias (unedited)")
    generate.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    generate.add_argument("--max-new-tokens", type=int, default=20)
    generate.add_argument("--compare", action="store_true", help="with --editor: the unedited text beside it")
    add_chat_template_flag(generate)
    generate.set_defaults(handler=_generate)


def _edit(args: argparse.Namespace) -> int:
    from rledit.data import load_requests
    from rledit.editor import Editor, comparison_table

    requests = load_requests(args.data)
    if args.step_size is not None and args.step_size < 1:
        raise ValueError(f"--step-size must be >= 1, got {args.step_size}")
    checkpoint = args.checkpoint or DEFAULT_EDITORS.get((args.model, args.method))
    print(f"editing {args.model} with {args.method}"
          + (f" (trained editor {checkpoint})" if checkpoint else " (no trained editor: untrained hypernetwork)"
             if args.method in ("rledit", "malmen", "mend") else ""))
    editor = Editor.from_pretrained(args.model, method=args.method, checkpoint=checkpoint,
                                    chat_template=args.chat_template or None)
    size = args.step_size or len(requests)
    for start in range(0, len(requests), size):
        step = editor.apply(requests[start:start + size])
        print(f"step {step.id}: {step.n_edits} edits in {step.seconds:.2f} s")
    print(comparison_table(editor.compare([r.prompt for r in requests], args.max_new_tokens)))
    editor.save(args.out)
    print(f"saved: {args.out} (load with Editor.load or `rledit generate --editor {args.out}`)")
    if args.save_pretrained:
        editor.save_pretrained(args.save_pretrained)
        print(f"merged Hugging Face model: {args.save_pretrained}")
    if args.export_peft:
        editor.store.export_peft(args.export_peft)
        print(f"peft LoRA adapter: {args.export_peft}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from rledit.cli import chat_template_flag, loaded_model
    from rledit.editor import Editor, comparison_table

    if args.compare and not args.editor:
        raise ValueError("--compare needs --editor (an edited model to compare with its unedited one)")
    if args.editor:
        editor = Editor.load(args.editor)
        chat_template_flag(args, editor.tokenizer)
        if args.compare:
            print(comparison_table(editor.compare(args.prompt, args.max_new_tokens)))
            return 0
        texts = editor.generate(args.prompt, args.max_new_tokens)
    else:
        from rledit.eval.generation import greedy_decode

        loaded = loaded_model(args)
        ids = greedy_decode(loaded.model, loaded.tokenizer, args.prompt, [args.max_new_tokens] * len(args.prompt))
        texts = [loaded.tokenizer.decode(row, skip_special_tokens=True) for row in ids]
    for prompt, text in zip(args.prompt, texts):
        print(f"{prompt}{text}")
    return 0
