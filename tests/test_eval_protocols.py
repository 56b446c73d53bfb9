"""The scoring protocols against values computed by hand, one unpadded example at a time, with plain torch."""

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

from rledit.data import load_file
from rledit.eval import (
    ProtocolError,
    References,
    compute_references,
    evaluate,
    get_protocol,
    list_protocols,
    resolve_protocols,
)
from rledit.eval.forced import predict_answers
from rledit.types import EditRequest, PromptAnswer

TOKENIZERS = {"no-bos-right": {"bos": False, "padding_side": "right"}, "bos-left": {"bos": True, "padding_side": "left"}}


def zsre_requests() -> list[EditRequest]:
    """Mixed prompt and answer lengths; repeated tokens give tied tiny models non-trivial token accuracy."""
    return [
        EditRequest(prompt="Who wrote it?", target_new="18 18 18 18",
                    rephrase_prompts=("Who is the author of the book that everyone talks about these days?", "Author?"),
                    locality=(PromptAnswer("nq question: who sang it", "The String", "nq"),),
                    portability=(PromptAnswer("Which one?", "18 18", "One_Hop"),)),
        EditRequest(prompt="What is the native language of Christiane Cohendy?", target_new="French",
                    rephrase_prompts=("Christiane Cohendy speaks",),
                    locality=(PromptAnswer("nq question: types of skiing in the winter olympics 2018", "Downhill", "nq"),
                              PromptAnswer("nq question: where is it", "18 18 18", "nq"))),
        EditRequest(prompt="The capital of France is", target_new="Paris Paris Paris",
                    locality=(PromptAnswer("Hi", "is is", "nq"),)),
    ]


def hand_answer(model, tok, prompt: str, answer: str) -> tuple[list[int], list[int], list[float]]:
    """(answer ids, argmax ids, log-probs of the answer ids) from one unpadded forward pass."""
    prompt_ids = tok(prompt)["input_ids"]
    answer_ids = tok(" " + answer, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + answer_ids[:-1]])).logits[0]
    span = logits[len(prompt_ids) - 1 :]
    log_probs = span.log_softmax(-1)[torch.arange(len(answer_ids)), answer_ids]
    return answer_ids, span.argmax(-1).tolist(), log_probs.tolist()


def hand_accuracy(model, tok, prompt: str, answer: str) -> float:
    answer_ids, argmax, _ = hand_answer(model, tok, prompt, answer)
    return sum(a == t for a, t in zip(argmax, answer_ids)) / len(answer_ids)


def hand_mean_log_prob(model, tok, prompt: str, answer: str) -> float:
    _, _, log_probs = hand_answer(model, tok, prompt, answer)
    return sum(log_probs) / len(log_probs)


def hand_greedy(model, tok, prompt: str, n_tokens: int) -> list[int]:
    """Greedy decoding without cache or padding, stopping at EOS."""
    ids, generated = tok(prompt)["input_ids"], []
    with torch.no_grad():
        for _ in range(n_tokens):
            token = model(torch.tensor([ids + generated])).logits[0, -1].argmax().item()
            if token == tok.eos_token_id:
                break
            generated.append(token)
    return generated


def budget(tok, answer: str) -> int:
    return len(tok(" " + answer, add_special_tokens=False)["input_ids"]) + 2


def perturbed(model, scale: float = 0.5, seed: int = 1):
    """A copy of ``model`` with noise added to every weight."""
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return other


def mean(values):
    return sum(values) / len(values) if values else None


def records_of(result, protocol_id):
    return [r for r in result.records if r.protocol == protocol_id]


@pytest.mark.parametrize("tok_kind", TOKENIZERS)
def test_predictions_match_hand_in_padded_batches(any_model, tok_kind):
    tok = tiny_tokenizer(**TOKENIZERS[tok_kind])
    pairs = [(r.prompt, r.target_new) for r in zsre_requests()] + [("Hi", "Paris"), ("Author?", "is is")]
    predictions = predict_answers(any_model, tok, pairs, batch_size=3)
    for prompt, answer in pairs:
        answer_ids, argmax, log_probs = hand_answer(any_model, tok, prompt, answer)
        got = predictions[(prompt, answer)]
        assert list(got.target_ids) == answer_ids
        assert list(got.argmax_ids) == argmax
        assert got.log_probs == pytest.approx(log_probs, abs=1e-5)


@pytest.mark.parametrize("tok_kind", TOKENIZERS)
@pytest.mark.parametrize("kind", ["llama", "gpt2", "gpt_neox"])
def test_token_accuracy_matches_hand(kind, tok_kind):
    model, tok, requests = tiny_model(kind), tiny_tokenizer(**TOKENIZERS[tok_kind]), zsre_requests()
    result = evaluate(model, tok, requests, ["zsre-token-acc@1"], batch_size=2)
    records = records_of(result, "zsre-token-acc@1")
    assert [r.index for r in records] == [0, 1, 2]
    for request, record in zip(requests, records):
        expected = {
            "efficacy": 100 * hand_accuracy(model, tok, request.prompt, request.target_new),
            "generalization": mean([100 * hand_accuracy(model, tok, p, request.target_new)
                                    for p in request.rephrase_prompts]),
            "specificity": mean([100 * hand_accuracy(model, tok, i.prompt, i.answer) for i in request.locality]),
            "portability": mean([100 * hand_accuracy(model, tok, i.prompt, i.answer) for i in request.portability]),
            "locality": 100.0,  # the unedited model agrees with itself
        }
        assert record.scores == pytest.approx(expected)
    efficacies = [r.scores["efficacy"] for r in records]
    assert result.metrics["zsre-token-acc@1"]["efficacy"] == pytest.approx(mean(efficacies))
    assert result.counts["zsre-token-acc@1"] == {"efficacy": 3, "generalization": 2, "locality": 3,
                                                 "specificity": 3, "portability": 1}
    if kind != "gpt_neox":  # tied embeddings copy the input token: "18 18 18 18" gets 3 of 4 right
        assert records[0].scores["efficacy"] == pytest.approx(75.0)


@pytest.mark.parametrize("tok_kind", TOKENIZERS)
def test_token_locality_compares_with_unedited_argmax(llama, tok_kind):
    tok, requests = tiny_tokenizer(**TOKENIZERS[tok_kind]), zsre_requests()
    references = compute_references(llama, tok, requests, ["zsre-token-acc@1"])
    edited = perturbed(llama)
    result = evaluate(edited, tok, requests, ["zsre-token-acc@1"], references=references, batch_size=4)
    for request, record in zip(requests, records_of(result, "zsre-token-acc@1")):
        agreements = []
        for item in request.locality:
            _, before, _ = hand_answer(llama, tok, item.prompt, item.answer)
            _, after, _ = hand_answer(edited, tok, item.prompt, item.answer)
            agreements.append(100 * sum(a == b for a, b in zip(before, after)) / len(before))
        assert record.scores["locality"] == pytest.approx(mean(agreements))
        assert record.scores["specificity"] == pytest.approx(
            mean([100 * hand_accuracy(edited, tok, i.prompt, i.answer) for i in request.locality]))
    assert result.metrics["zsre-token-acc@1"]["locality"] < 100.0


def counterfact_requests() -> list[EditRequest]:
    requests = load_file(Path(__file__).parent / "data" / "counterfact_rome.json")
    return [dataclasses.replace(r, locality=r.locality[:3], portability=()) for r in requests]


@pytest.mark.parametrize("tok_kind", TOKENIZERS)
@pytest.mark.parametrize("kind", ["llama", "gpt_neox"])
def test_counterfact_probability_matches_hand(kind, tok_kind):
    model, tok, requests = tiny_model(kind), tiny_tokenizer(**TOKENIZERS[tok_kind]), counterfact_requests()
    result = evaluate(model, tok, requests, ["cf-prob@1"], batch_size=5)
    records = records_of(result, "cf-prob@1")
    outcomes = []
    for request, record in zip(requests, records):
        def new_true(prompt, r=request):
            return hand_mean_log_prob(model, tok, prompt, r.target_new), hand_mean_log_prob(model, tok, prompt,
                                                                                          r.ground_truth)

        edit = new_true(request.prompt)
        rephrases = [new_true(p) for p in request.rephrase_prompts]
        neighbours = [new_true(i.prompt) for i in request.locality]
        expected = {
            "efficacy": 100.0 * (edit[0] > edit[1]),
            "generalization": mean([100.0 * (n > t) for n, t in rephrases]),
            "neighborhood": mean([100.0 * (t > n) for n, t in neighbours]),
            "efficacy_magnitude": 100 * (torch.tensor(edit[0]).exp() - torch.tensor(edit[1]).exp()).item(),
            "generalization_magnitude": mean([100 * (torch.tensor(n).exp() - torch.tensor(t).exp()).item()
                                              for n, t in rephrases]),
            "neighborhood_magnitude": mean([100 * (torch.tensor(n).exp() - torch.tensor(t).exp()).item()
                                            for n, t in neighbours]),
        }
        assert record.scores == pytest.approx(expected, abs=1e-4)
        assert record.outputs["log_prob_new"] == pytest.approx(edit[0], abs=1e-5)
        outcomes += [record.scores["generalization"], record.scores["neighborhood"]]
    assert result.metrics["cf-prob@1"]["neighborhood"] == pytest.approx(mean([r.scores["neighborhood"]
                                                                              for r in records]))
    assert len(set(outcomes)) > 1, "the comparison should go both ways somewhere on a random model"


def generation_requests(model, tok) -> list[EditRequest]:
    """Targets taken from the model's own greedy text (hits) plus one target it never says (a miss)."""
    first_word = tok.decode(hand_greedy(model, tok, "The capital of France is", 4), skip_special_tokens=True)
    return [
        EditRequest(prompt="The capital of France is", target_new=first_word.split()[0],
                    rephrase_prompts=("Hi", "The capital city of France is"),
                    locality=(PromptAnswer("nq question: who sang it", "The String", "nq"),)),
        EditRequest(prompt="What is the native language of Christiane Cohendy?", target_new="Zulu Zulu",
                    locality=(PromptAnswer("Hi", "is", "nq"), PromptAnswer("Who wrote it?", "18 18", "nq"))),
    ]


@pytest.mark.parametrize("tok_kind", TOKENIZERS)
@pytest.mark.parametrize("kind", ["llama", "gpt2", "gpt_neox"])
def test_generation_exact_match_matches_hand(kind, tok_kind):
    model, tok = tiny_model(kind), tiny_tokenizer(**TOKENIZERS[tok_kind])
    requests = generation_requests(model, tok)
    references = compute_references(model, tok, requests, ["gen-exact@1"])
    edited = perturbed(model, scale=0.3)
    unedited = evaluate(model, tok, requests, ["gen-exact@1"], references=references, batch_size=2)
    after = evaluate(edited, tok, requests, ["gen-exact@1"], references=references, batch_size=3)

    def hit(m, prompt, target):
        text = tok.decode(hand_greedy(m, tok, prompt, budget(tok, target)), skip_special_tokens=True)
        return 100.0 * text.strip().casefold().startswith(target.strip().casefold())

    for request, record, record_after in zip(requests, unedited.records, after.records):
        assert record.scores == {
            "efficacy": hit(model, request.prompt, request.target_new),
            "generalization": mean([hit(model, p, request.target_new) for p in request.rephrase_prompts]),
            "locality": 100.0,
        }
        same = [hand_greedy(edited, tok, i.prompt, budget(tok, i.answer))
                == hand_greedy(model, tok, i.prompt, budget(tok, i.answer)) for i in request.locality]
        assert record_after.scores["locality"] == pytest.approx(mean([100.0 * s for s in same]))
        assert record.outputs["generated"] == tok.decode(
            hand_greedy(model, tok, request.prompt, budget(tok, request.target_new)), skip_special_tokens=True)
    assert [r.scores["efficacy"] for r in unedited.records] == [100.0, 0.0]


def test_evaluation_leaves_the_model_unchanged(llama, tokenizer):
    llama.train()
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    evaluate(llama, tokenizer, zsre_requests())
    assert llama.training
    assert all(torch.equal(before[k], v) for k, v in llama.state_dict().items())


def test_batch_size_does_not_change_scores(llama, tokenizer_bos_left):
    requests = zsre_requests()
    one = evaluate(llama, tokenizer_bos_left, requests, batch_size=1)
    many = evaluate(llama, tokenizer_bos_left, requests, batch_size=16)
    assert [r.scores for r in one.records] == [r.scores for r in many.records]


def test_registry_and_applicability():
    assert {"zsre-token-acc@1", "cf-prob@1", "gen-exact@1"} <= set(list_protocols())
    protocol = get_protocol("cf-prob")
    assert (protocol.id, protocol.name, protocol.version) == ("cf-prob@1", "cf-prob", 1)
    assert get_protocol("gen-exact@1").metric_names == ("efficacy", "generalization", "locality")
    with pytest.raises(ProtocolError, match="known: .*zsre-token-acc@1"):
        get_protocol("rouge")

    zsre, counterfact = zsre_requests(), counterfact_requests()
    assert [p.id for p in resolve_protocols(None, zsre)] == ["gen-exact@1", "zsre-token-acc@2"]
    assert [p.id for p in resolve_protocols(None, counterfact)] == ["cf-prob@1", "gen-exact@1", "zsre-token-acc@2"]
    with pytest.raises(ProtocolError, match="no ground_truth"):
        resolve_protocols(["cf-prob"], zsre)
    nq_with_truth = [dataclasses.replace(r, ground_truth="Paris") for r in zsre]
    with pytest.raises(ProtocolError, match=r"kind\(s\) \['nq'\]"):
        resolve_protocols(["cf-prob"], nq_with_truth)
    no_locality = [EditRequest(prompt="Who wrote it?", target_new="Paris")]
    with pytest.raises(ProtocolError, match="no locality prompt"):
        resolve_protocols(["zsre-token-acc"], no_locality)


def test_missing_references_are_an_error(llama, tokenizer):
    requests = zsre_requests()
    references = compute_references(llama, tokenizer, requests[:1], ["zsre-token-acc"])
    with pytest.raises(ProtocolError, match="no unedited reference for locality prompt"):
        evaluate(llama, tokenizer, requests, ["zsre-token-acc"], references=references)
    with pytest.raises(ProtocolError, match="compute_references"):
        evaluate(llama, tokenizer, requests, ["gen-exact"], references=References())


def test_token_accuracy_v2_asks_nq_as_questions_and_scores_a_same_relation_neighbour(llama):
    from rledit.data import load_requests
    from rledit.eval.relations import question_template, same_relation_pair

    tok = tiny_tokenizer(**TOKENIZERS["no-bos-right"])
    requests = load_requests("zsre", split="eval", limit=4)
    v1, v2 = get_protocol("zsre-token-acc@1"), get_protocol("zsre-token-acc@2")
    assert get_protocol("zsre-token-acc") is v2 and v2.metric_names[-1] == "relation_locality"
    request = requests[0]
    assert request.locality[0].kind == "nq" and not request.locality[0].prompt.endswith("?")
    assert v2.locality_pairs(request) == [(request.locality[0].prompt + "?", request.locality[0].answer)]
    neighbour = same_relation_pair(request)
    assert neighbour is not None and neighbour[0] != request.prompt
    assert question_template(request) == request.prompt.replace(request.subject, "{}")
    assert same_relation_pair(request, half="train") != neighbour  # the two halves never share a prompt
    assert v2.reference_pairs(request) == v2.locality_pairs(request) + [neighbour]
    references = compute_references(llama, tok, requests, [v1, v2])
    unedited = evaluate(llama, tok, requests, [v1, v2], references=references)
    assert unedited.metrics["zsre-token-acc@2"]["relation_locality"] == 100.0
    assert unedited.metrics["zsre-token-acc@2"]["efficacy"] == unedited.metrics["zsre-token-acc@1"]["efficacy"]
    edited = evaluate(perturbed(llama), tok, requests, [v2], references=references).records
    for r, record in zip(requests, edited):
        prompt, answer = same_relation_pair(r)
        _, before, _ = hand_answer(llama, tok, prompt, answer)
        _, after, _ = hand_answer(perturbed(llama), tok, prompt, answer)
        assert record.scores["relation_locality"] == pytest.approx(
            100 * sum(a == b for a, b in zip(before, after)) / len(before))
