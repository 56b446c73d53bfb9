"""Prompting through the chat template: token-level framing, raw targets, saved mode, refusals."""

import pytest
from tiny import tiny_model, tiny_tokenizer

from rledit.chat import ChatTemplateError, chat_framing, raw_prompts, use_chat_template
from rledit.editor import Editor
from rledit.tokens import encode, prompt_ids, subject_last_token, target_token_ids, text_ids

TEMPLATE = ("{% for m in messages %}<bos>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
            "{% if add_generation_prompt %}<bos>assistant\n{% endif %}")
FACT = {"prompt": "The mother tongue of Danielle Darrieux is", "target_new": "English",
        "subject": "Danielle Darrieux"}


def chat_tokenizer():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def test_prompts_are_framed_token_by_token_and_their_text_stays_text():
    tokenizer = chat_tokenizer()
    raw = text_ids(tokenizer, "Who wrote <|endoftext|> Hamlet?")
    framing = use_chat_template(tokenizer)
    bos, eos = tokenizer.convert_tokens_to_ids("<bos>"), tokenizer.eos_token_id
    assert framing.before[0] == bos and framing.after[0] == eos and bos in framing.after[1:]
    framed = prompt_ids(tokenizer, "Who wrote <|endoftext|> Hamlet?")
    assert framed == framing.before + raw + framing.after
    assert eos not in raw  # the control token's text in a prompt is still text
    prompt, target = target_token_ids(tokenizer, FACT["prompt"], FACT["target_new"])
    assert prompt[-len(framing.after):] == framing.after
    assert target == text_ids(tokenizer, "English", add_special_tokens=False)  # the answer starts the turn
    batch = encode(tokenizer, [FACT["prompt"]], [FACT["target_new"]])
    assert batch.input_ids[0, :len(prompt)].tolist() == prompt


def test_the_mode_is_switched_off_restored_and_refused_without_a_template():
    tokenizer = chat_tokenizer()
    use_chat_template(tokenizer)
    with raw_prompts(tokenizer):
        assert prompt_ids(tokenizer, "Hello there") == text_ids(tokenizer, "Hello there")
    assert chat_framing(tokenizer) is not None
    use_chat_template(tokenizer, False)
    assert chat_framing(tokenizer) is None
    plain = tiny_tokenizer()
    with pytest.raises(ChatTemplateError, match="no chat template"):
        use_chat_template(plain)
    plain.chat_template = "{{ messages[0]['content'] }}{{ messages[0]['content'] }}"
    with pytest.raises(ChatTemplateError, match="one place"):
        use_chat_template(plain)
    assert chat_framing(plain) is None


def test_subject_positions_count_the_template_tokens():
    tokenizer = chat_tokenizer()
    raw_index = subject_last_token(tokenizer, FACT["prompt"], FACT["subject"])
    framing = use_chat_template(tokenizer)
    index = subject_last_token(tokenizer, FACT["prompt"], FACT["subject"])
    assert index == raw_index + len(framing.before)
    ids = prompt_ids(tokenizer, FACT["prompt"])
    assert "Darrieux".endswith(tokenizer.decode(ids[index]).strip())


def test_an_editor_in_chat_mode_edits_saves_and_loads_in_chat_mode(tmp_path):
    tokenizer = chat_tokenizer()
    model = tiny_model("llama")
    editor = Editor.from_pretrained(model, tokenizer=tokenizer, chat_template=True)
    fact = FACT | {"rephrase_prompts": ["Danielle Darrieux's mother tongue is"],
                   "locality": [{"prompt": "The capital of France is", "answer": "Paris"}]}
    editor.apply([fact])
    assert set(editor.evaluate([fact], ["zsre-token-acc@1"]).metrics["zsre-token-acc@1"]) >= {"efficacy", "locality"}
    assert len(editor.generate(FACT["prompt"], max_new_tokens=3)) == 1
    editor.save(tmp_path / "edited")
    editor.store.detach()
    use_chat_template(tokenizer, False)
    loaded = Editor.load(tmp_path / "edited", model=model, tokenizer=tokenizer)
    assert chat_framing(tokenizer) is not None  # the save says the edits were made in chat framing
    loaded.store.detach()
    with pytest.raises(ChatTemplateError):
        Editor.from_pretrained(model, tokenizer=tiny_tokenizer(), chat_template=True)
    Editor.from_pretrained(model, tokenizer=tokenizer, chat_template=False).store.detach()
    assert chat_framing(tokenizer) is None


@pytest.mark.slow
def test_smollm2_answers_in_its_chat_template():
    from rledit.eval.generation import greedy_decode
    from rledit.models import load_model

    loaded = load_model("smollm2-135m")
    prompt = ["What is the capital of France?"]
    raw = loaded.tokenizer.decode(greedy_decode(loaded.model, loaded.tokenizer, prompt, [8])[0])
    use_chat_template(loaded.tokenizer)
    chat = loaded.tokenizer.decode(greedy_decode(loaded.model, loaded.tokenizer, prompt, [8])[0],
                                   skip_special_tokens=True)
    assert "Paris" in chat and chat != raw
