"""The learned early exit: calibration text, feature collection, training, export (tiny random models)."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from mirror_deploy.errors import MirrorDeployError
from mirror_deploy.export.graphs import TargetSegment
from mirror_deploy.export.loading import open_source
from mirror_deploy.runtimes.kv import causal_mask
from mirror_deploy.tiny import build_tiny_pair
from mirror_deploy.tuning.attach import trained_on
from mirror_deploy.tuning.calibration import (CATEGORIES, CalibrationPrompt, encode_prompts, generate_sequences,
                                              load_prompts, prompt_sha256)
from mirror_deploy.tuning.features import FrozenHead, collect_features, shared_preamble, split_by_sequence
from mirror_deploy.tuning.lens import LensConfig, fit_lens, hard_negatives, main, train_translator
from mirror_deploy.tuning.translator import AffineTranslator, export_onnx, load_translators, save_translators

BOUNDARIES = [2, 4]
CONFIG = LensConfig(support=16, kappa=4, epochs=15, batch=64, lr=3e-3)
PROMPTS = [CalibrationPrompt(c, t) for c in CATEGORIES
           for t in (f"A {c} question: why?", f"Tell me about {c}, please.", f"{c}: 1, 2, 3")]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    target, _ = build_tiny_pair(tmp_path_factory.mktemp("lens"), "qwen2", target_layers=6)
    src = open_source(target, "target")
    src.load_model()
    return src


@pytest.fixture(scope="module")
def sequences(source):
    return generate_sequences(source.model, source.load_tokenizer(), PROMPTS, new_tokens=20, batch_size=len(PROMPTS))


@pytest.fixture(scope="module")
def features(source, sequences):
    return collect_features(source.model, sequences, BOUNDARIES, support=CONFIG.support)


@pytest.fixture(scope="module")
def fitted(source, features):
    return fit_lens(features, FrozenHead.of(source.model), CONFIG)


def test_shipped_prompts_cover_every_task():
    prompts = load_prompts()
    assert 36 <= len(prompts) <= 60
    assert {p.category for p in prompts} == set(CATEGORIES)
    assert min(sum(p.category == c for p in prompts) for c in CATEGORIES) >= 6


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"), ("", "holds no prompts"), ("\n  \n", "holds no prompts"),
    ("{not json\n", "not JSON"), ('{"category": "poetry", "prompt": "hi"}\n', "category"),
    ('{"category": "qa", "prompt": "  "}\n', "prompt"),
])
def test_bad_calibration_file_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "prompts.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(MirrorDeployError, match=message) as err:
        load_prompts(path)
    assert err.value.fix


def test_calibration_longer_than_capacity_is_a_clear_error(source):
    tokenizer = source.load_tokenizer()
    long = CalibrationPrompt("chat", "x" * 300)
    with pytest.raises(MirrorDeployError, match="longer than the capacity of 256") as err:
        encode_prompts(tokenizer, [PROMPTS[0], long], new_tokens=8, capacity=256)
    assert "prompt 2" in str(err.value) and err.value.fix
    with pytest.raises(MirrorDeployError, match="capacity"):
        generate_sequences(source.model, tokenizer, [long], new_tokens=8, capacity=256)


def test_cli_refuses_a_missing_prompt_file(source, tmp_path, capsys):
    assert main([str(source.path), "--prompts", str(tmp_path / "none.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_sequences_are_the_models_own_greedy_continuation(source, sequences):
    tokenizer = source.load_tokenizer()
    assert [s.ids[:s.prompt_len] for s in sequences] == [
        tuple(tokenizer.apply_chat_template([{"role": "user", "content": p.text}], add_generation_prompt=True))
        for p in PROMPTS]
    agree = total = 0
    with torch.no_grad():
        for seq in sequences:
            logits = source.model(torch.tensor([seq.ids])).logits[0]
            for p in seq.continuation_positions:
                agree += int(logits[p].argmax()) == seq.ids[p + 1]
                total += 1
    assert total >= len(PROMPTS) * 10 and agree / total > 0.97


def test_boundary_hidden_state_is_what_the_exported_prefix_hands_over(source, sequences, features):
    """hidden_states[L] == what the segments [0, L) hand over: the translator adapts the real handover."""
    seq = sequences[0]
    n = len(seq.ids)
    shape = source.shape
    for boundary in BOUNDARIES:
        prefix = TargetSegment(source.arch, source.model, 0, boundary).eval()
        empty = [torch.zeros(1, 0, shape.kv_heads, shape.head_dim)] * (2 * boundary)
        with torch.no_grad():
            out = prefix(torch.tensor([seq.ids]), torch.arange(n)[None], torch.from_numpy(causal_mask(0, n, 0)),
                         *empty)
        rows = list(seq.continuation_positions)
        first = features.sequence == 0
        np.testing.assert_allclose(out[0][0, rows].numpy(),
                                   features.hidden[boundary][first & features.continuation], atol=1e-4)
        prompt = list(range(shared_preamble(sequences), seq.prompt_len - 1))
        assert prompt, "the tiny prompts must leave prompt rows past the shared preamble"
        np.testing.assert_allclose(out[0][0, prompt].numpy(),
                                   features.hidden[boundary][first & ~features.continuation], atol=1e-4)


def test_head_input_gives_the_final_logits(source, features):
    head = FrozenHead.of(source.model)
    logits = head.logits_of_normed(torch.from_numpy(features.head_input), torch.from_numpy(features.final_ids))
    np.testing.assert_allclose(torch.log_softmax(logits, -1).numpy(),
                               torch.log_softmax(torch.from_numpy(features.final_logprobs), -1).numpy(), atol=1e-4)


def test_final_top1_is_the_next_token(sequences, features):
    following = np.concatenate([[s.ids[p + 1] for p in s.continuation_positions] for s in sequences])
    assert (features.continuation_rows().final_ids[:, 0] == following).mean() > 0.97


def test_preamble_every_prompt_shares_is_left_out_of_training(sequences, features):
    start = shared_preamble(sequences)
    assert 0 < start < min(s.prompt_len for s in sequences)
    assert len({s.ids[start] for s in sequences}) > 1
    prompt_rows = sum(s.prompt_len - 1 - start for s in sequences)
    assert (~features.continuation).sum() == prompt_rows


def test_hard_negatives_are_the_exits_best_tokens_outside_the_support(source, features):
    head = FrozenHead.of(source.model)
    hidden = torch.from_numpy(features.hidden[BOUNDARIES[0]][:20])
    support = torch.from_numpy(features.final_ids[:20, :8])
    negatives = hard_negatives(head, AffineTranslator(hidden.shape[1]), hidden, support, 5)
    ranked, _ = head.topk(hidden, 13)
    for row in range(20):
        outside = [t for t in ranked[row].tolist() if t not in support[row].tolist()][:5]
        assert negatives[row].tolist() == outside


def test_untrained_translator_is_the_logit_lens():
    hidden = torch.randn(5, 64) * 10
    assert torch.equal(AffineTranslator(64, hidden.abs().mean(0))(hidden), hidden)


def test_training_is_deterministic_for_a_seed(source, features):
    head = FrozenHead.of(source.model)
    train, _ = split_by_sequence(features, CONFIG.held_out, CONFIG.seed)
    args = (head, train.hidden[2], train.final_ids, train.final_logprobs, train.head_input)
    short = LensConfig(**{**CONFIG.__dict__, "epochs": 3})
    first, second = train_translator(*args, short), train_translator(*args, short)
    other = train_translator(*args, LensConfig(**{**short.__dict__, "seed": 1}))
    assert first.weight.abs().sum() > 0
    assert torch.equal(first.weight, second.weight) and torch.equal(first.bias, second.bias)
    assert not torch.equal(first.weight, other.weight)


def test_split_is_by_sequence_and_keeps_every_category(features):
    train, test = split_by_sequence(features, 0.3, seed=0)
    assert not set(train.sequence) & set(test.sequence)
    assert train.rows + test.rows == features.rows
    assert {features.category[s] for s in set(test.sequence)} == set(CATEGORIES)


def test_learned_exit_beats_the_logit_lens_on_held_out_kl(fitted):
    _, reports = fitted
    assert [r.boundary for r in reports] == BOUNDARIES
    for r in reports:
        assert r.held_out_tokens > 0 and r.train_tokens > r.held_out_tokens
        assert r.learned_kl < 0.8 * r.lens_kl, r
        assert 0 <= r.lens_topk <= 1 and r.lens_top1 <= r.lens_topk and r.learned_top1 <= r.learned_topk
        assert r.choice in ("learned", "logit_lens")


def test_bad_boundaries_are_refused(source, sequences):
    with pytest.raises(MirrorDeployError, match="outside"):
        collect_features(source.model, sequences[:1], [0, 6])


def test_onnx_translator_matches_torch(fitted, tmp_path):
    translator = fitted[0][BOUNDARIES[0]]
    path = export_onnx(translator, tmp_path / "t.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for rows in (1, 8):
        hidden = torch.randn(1, rows, 64) * 3
        (adapted,) = session.run(None, {"hidden_states": hidden.numpy()})
        with torch.no_grad():
            expected = translator(hidden).numpy()
        assert not np.allclose(expected, hidden.numpy(), atol=1e-3)   # a trained, non-identity map
        np.testing.assert_allclose(adapted, expected, rtol=1e-4, atol=1e-4)


def test_translators_round_trip_through_a_file(fitted, tmp_path):
    translators, _ = fitted
    loaded = load_translators(save_translators(translators, tmp_path / "lens.safetensors"))
    assert sorted(loaded) == BOUNDARIES
    hidden = torch.randn(3, 64)
    for b in BOUNDARIES:
        assert torch.equal(loaded[b](hidden), translators[b](hidden))


def test_learn_exit_attaches_to_an_artifact_and_stays_lossless(tmp_path):
    """`learn-exit` trains at the artifact's exit layers, adds the graphs atomically, `check` compares them
    with the translator weights, and decoding with the learned exit still equals autoregressive."""
    from typer.testing import CliRunner

    from mirror_deploy import cli
    from mirror_deploy.check import PASS, check_artifact
    from mirror_deploy.decoding.config import GenerationConfig as G
    from mirror_deploy.decoding.engine import Engine
    from mirror_deploy.export.pipeline import ExportOptions, export_artifact
    from mirror_deploy.tiny import build_tiny_pair

    target, draft = build_tiny_pair(tmp_path / "m", "qwen2", target_layers=6, noise=0.05)
    art = export_artifact(target, draft, tmp_path / "art",
                          ExportOptions(kappa=4, gamma=4, max_context=256, branch_batch=4, exit_layers=[2, 3]))
    result = CliRunner().invoke(cli.app, ["learn-exit", str(art), "--new-tokens", "24", "--epochs", "20"])
    assert result.exit_code == 0, result.output
    engine = Engine(art)
    assert engine.target.graphs.adapters, "no learned exit was attached"
    shipped = {prompt_sha256(p.text) for p in load_prompts()}
    recorded = trained_on(art)     # the training split's prompts, for `tune` to keep out of its statistics
    assert recorded and recorded < shipped
    report = check_artifact(art)
    rows = [r for r in report.rows if r.check == "parity learned exit"]
    assert report.ok and rows and all(r.result == PASS for r in rows), [r for r in report.rows if r.result != "PASS"]
    layer = sorted(engine.target.graphs.adapters)[0]
    prompt = "The quick brown fox"
    expected = engine.generate(prompt, G(max_new_tokens=24, mode="ar", stop_at_eos=False)).tokens
    learned = engine.generate(prompt, G(max_new_tokens=24, exit_layer=layer, stop_at_eos=False))
    lens = engine.generate(prompt, G(max_new_tokens=24, exit_layer=layer, learned_exit=False, stop_at_eos=False))
    assert learned.tokens == expected == lens.tokens


def test_a_second_learn_exit_replaces_the_first_and_an_interrupted_one_changes_nothing(tmp_path, monkeypatch):
    """Adapter files are named by their content: a re-run writes beside the files the manifest hashes and
    replaces the manifest last, so killed before that the artifact is the first run's, whole and checked;
    finished, the first run's files are gone."""
    from mirror_deploy.check import check_artifact
    from mirror_deploy.export.pipeline import ExportOptions, export_artifact
    from mirror_deploy.tuning import attach as attach_module

    target, _ = build_tiny_pair(tmp_path / "m", "qwen2", target_layers=4)
    art = export_artifact(target, None, tmp_path / "art", ExportOptions(kappa=4, max_context=128, exit_layers=[2]))
    d = json.loads((art / "manifest.json").read_text())["target"]["hidden_size"]

    def translators(seed):
        torch.manual_seed(seed)
        t = AffineTranslator(d)
        torch.nn.init.normal_(t.weight, std=0.01)
        return {2: t}

    attach_module.attach(art, translators(1), None, ["a" * 64])
    first = {p.name: p.read_bytes() for p in art.iterdir() if p.is_file()}

    def interrupted(folder, manifest):
        raise KeyboardInterrupt
    with monkeypatch.context() as patch:
        patch.setattr(attach_module, "replace_manifest", interrupted)
        with pytest.raises(KeyboardInterrupt):
            attach_module.attach(art, translators(2), None, ["b" * 64])
    assert {p.name: p.read_bytes() for p in art.iterdir() if p.is_file()} == first
    assert check_artifact(art).ok and trained_on(art) == {"a" * 64}

    attach_module.attach(art, translators(2), None, ["b" * 64])
    now = {p.name for p in art.iterdir() if p.is_file()}
    gone = {n for n in first if n.startswith("exit_adapter")} - now
    assert gone and len(gone) == 3, gone       # the first run's graph, weights and prompts
    assert check_artifact(art).ok and trained_on(art) == {"b" * 64}
    attach_module.attach(art, translators(2), None, ["b" * 64])   # the same again: nothing to write or delete
    assert {p.name for p in art.iterdir() if p.is_file()} == now and check_artifact(art).ok
