"""General-ability probes (SST-2 zero-shot accuracy, held-out perplexity) and `rledit bench --general`."""

import json
import math

import pytest
import torch
from tiny import tiny_model

from rledit.bench import BenchSpec, run_benchmark
from rledit.bench_report import general_table, write_report, write_run
from rledit.cli import main
from rledit.eval.general import (
    SST2_LABELS,
    SST2_TEMPLATE,
    general_probe,
    load_sst2,
    perplexity,
    sst2_accuracy,
)
from rledit.tokens import target_token_ids, text_ids


def test_the_bundled_sst2_splits_are_whole_and_disjoint():
    dev, test = load_sst2("dev"), load_sst2("test")
    assert len(dev) == 872 and sum(r.label for r in dev) == 444
    assert len(test) == 1821
    assert not {r.text for r in dev} & {r.text for r in test}
    with pytest.raises(ValueError, match="'dev' and 'test'"):
        load_sst2("train")


def test_perplexity_is_the_exponent_of_the_mean_token_loss_after_the_first_word(tokenizer):
    model = tiny_model("llama").eval()
    texts = ["the movie is long and dull", "a fine film , well acted"]
    total, count = 0.0, 0
    for text in texts:  # by hand: one unpadded row each, tokens after the first word's
        first = len(text_ids(tokenizer, text.split(" ", 1)[0]))
        ids = torch.tensor([text_ids(tokenizer, text)])
        with torch.no_grad():
            logprobs = model(input_ids=ids).logits[0].log_softmax(-1)
        targets = ids[0, first:]
        total -= float(logprobs[first - 1:-1].gather(1, targets[:, None]).sum())
        count += len(targets)
    assert perplexity(model, tokenizer, texts, batch_size=1) == pytest.approx(math.exp(total / count), rel=1e-4)
    assert perplexity(model, tokenizer, texts, batch_size=2) == pytest.approx(math.exp(total / count), rel=1e-4)


def test_sst2_accuracy_compares_the_two_label_words(tokenizer):
    model = tiny_model("llama").eval()
    rows = load_sst2("dev", 12)
    prompts = [SST2_TEMPLATE.format(sentence=r.text) for r in rows]
    def score(prompt, word):  # by hand: one unpadded row, the word's tokens after the prompt
        prompt_part, word_ids = target_token_ids(tokenizer, prompt, word)
        ids = torch.tensor([prompt_part + word_ids])
        with torch.no_grad():
            logprobs = model(input_ids=ids).logits[0].log_softmax(-1)
        return float(logprobs[len(prompt_part) - 1:-1].gather(1, torch.tensor(word_ids)[:, None]).sum())

    scores = [[score(p, w) for p in prompts] for w in SST2_LABELS]
    expected = 100 * sum(int(pos > neg) == r.label for r, neg, pos in zip(rows, *scores)) / len(rows)
    assert sst2_accuracy(model, tokenizer, limit=12) == pytest.approx(expected)


def test_bench_general_probes_unedited_on_the_curve_and_at_the_end(tokenizer, tmp_path, monkeypatch):
    from rledit import bench

    calls = []

    def probe(model, tok):
        calls.append(1)
        return general_probe(model, tok, sst2_limit=16, text_limit=8)

    monkeypatch.setattr(bench, "general_probe", probe)
    model = tiny_model("llama")
    spec = BenchSpec(method="rledit", data="zsre", steps=3, batch=2, timing="curve", eval_every=2,
                     protocols=["zsre-token-acc@1"], general=True)
    summary, result = run_benchmark(model, tokenizer, "tiny-llama", spec, progress=False)
    general = summary["general"]
    assert len(calls) == 3 and [p["step"] for p in general["curve"]] == [2, 3]
    assert general["edited"] == {k: general["curve"][-1][k] for k in ("sst2_accuracy", "perplexity")}
    assert general["unedited"] == probe(model, tokenizer)  # the model is left unedited afterwards
    run_benchmark(model, tokenizer, "tiny-llama", spec, progress=False,
                  general_unedited=general["unedited"])
    assert len(calls) == 4 + 2  # the shared unedited scores are not computed again
    path, _ = write_run(tmp_path / "run.json", summary, result)
    table, _ = write_report(tmp_path)
    assert "| unedited |" in general_table([summary]) and "General ability" in table.read_text()
    assert json.loads(path.read_text())["general"]["unedited"]["perplexity"] > 1


def test_cli_bench_general_writes_the_scores_and_the_table(tiny_folder, tmp_path, monkeypatch):
    from rledit import bench

    monkeypatch.setattr(bench, "general_probe",
                        lambda m, t: general_probe(m, t, sst2_limit=8, text_limit=4))
    out = tmp_path / "runs"
    assert main(["bench", "--methods", "rledit,ultraedit", "--model", str(tiny_folder), "--steps", "1",
                 "--batch", "2", "--protocols", "zsre-token-acc@1", "--general", "--out", str(out)]) == 0
    runs = [json.loads((out / f"{name}.json").read_text())["general"] for name in ("rledit", "ultraedit")]
    assert runs[0]["unedited"] == runs[1]["unedited"] and set(runs[0]["edited"]) == {"sst2_accuracy", "perplexity"}
    assert (out / "table.md").read_text().count("| unedited |") == 2  # the headline and the general table


@pytest.mark.slow
def test_smollm2_reads_sentiment_zero_shot():
    from rledit.models import load_model

    loaded = load_model("smollm2-135m")
    assert sst2_accuracy(loaded.model, loaded.tokenizer, limit=64) > 65  # 78.6 on all 872
    texts = [r.text for r in load_sst2("test", 16)]
    assert 50 < perplexity(loaded.model, loaded.tokenizer, texts) < 1000  # 266 on the first 500
