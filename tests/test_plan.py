"""`kunlun plan`: the planner's formulas against hand-computed values on tiny configs, the layouts it refuses and
why, its calibration against published runs (within ±30%), and the command line."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from kunlunbaize.arch import BASELINE, DEFAULT
from kunlunbaize.config import ModelConfig
from kunlunbaize.plan import Job, Layout, boundary_tensors, estimate, get_gpu, layout_problems, plan, shape_of
from kunlunbaize.plan.calibration import REFERENCES, TOLERANCE, predict
from kunlunbaize.plan.memory import in_flight, rank_memory
from kunlunbaize.plan.shape import layer_activations

TINY = ModelConfig.preset("tiny")
PLAIN = ModelConfig.preset("tiny", transformerx=False, dense_residual=False, mtp_depth=0)
H100 = get_gpu("H100")


def job(cfg: ModelConfig = PLAIN, n: int = 1, seq: int = 128, batch: int = 8, spec=DEFAULT, **kw) -> Job:
    return Job(cfg=cfg, spec=spec, gpu=H100, n_gpus=n, seq_len=seq, batch=batch, **kw)


# --- formulas ------------------------------------------------------------------------------------------------

def test_flops_split_adds_up_to_the_spec_count():
    for cfg, spec in ((TINY, DEFAULT), (PLAIN, DEFAULT), (TINY, BASELINE), (ModelConfig.preset("paper"), DEFAULT)):
        shape = shape_of(spec, cfg, 128)
        assert shape.flops == pytest.approx(spec.training_flops(cfg, 128), rel=1e-9)
    plain = shape_of(DEFAULT, PLAIN, 128)  # one plain layer: 3 × 2 × weights + 3 × 4·d·(T+1)/2 for attention
    d, kv, f = PLAIN.d_model, PLAIN.kv_dim, PLAIN.ffn_hidden
    assert plain.layer_flops == pytest.approx(6 * (2 * d * d + 2 * d * kv + 3 * d * f) + 12 * d * 64.5)
    assert plain.mtp_flops == 0 and shape_of(DEFAULT, TINY, 128).mtp_flops > 0


def test_an_architecture_is_sized_by_its_own_shapes():
    """The matched Llama is planned as the plain decoder it builds (its shape_config), not as KunlunBaize."""
    kb, llama = shape_of(DEFAULT, TINY, 128), shape_of(BASELINE, TINY, 128)
    assert kb.mtp_depth == 2 and kb.dense_residual and llama.mtp_depth == 0 and not llama.dense_residual
    assert llama.tp_regions == 2 and kb.tp_regions == 1 + 3 * len(TINY.conv_kernel_sizes)
    assert llama.params == pytest.approx(TINY.num_params() - TINY.param_breakdown()["mtp"], rel=0.01)
    assert llama.params == BASELINE.shape(TINY).num_params()


def test_single_gpu_fp32_memory_is_weights_gradients_adam_and_activations():
    shape = shape_of(DEFAULT, PLAIN, 128)
    mem = rank_memory(job(precision="fp32"), shape, Layout(micro_batch=8), 0)
    params = PLAIN.num_params()
    assert (mem.parameters, mem.gradients, mem.optimizer) == (4 * params, 4 * params, 8 * params)
    d, kv, f = PLAIN.d_model, PLAIN.kv_dim, PLAIN.ffn_hidden
    per_layer = 3 * d + 2 * (d + 2 * kv) + 2 * d + 4 * f  # attention + MLP elements per token
    assert mem.activations == 8 * 128 * PLAIN.n_layers * per_layer * 4
    assert mem.activations_full_ac == 8 * 128 * PLAIN.n_layers * d * 4  # each block's input
    assert mem.dense_outputs == 0 and mem.pipeline_buffers == 0
    full = rank_memory(job(precision="fp32"), shape, Layout(micro_batch=8, ac="full"), 0)
    assert full.transient == 8 * 128 * per_layer * 4  # the layer being recomputed (more than a chunk of logits)


def test_fsdp_shards_master_weights_gradients_and_adam_over_dp_shard_and_cp():
    shape = shape_of(DEFAULT, PLAIN, 128)
    one = rank_memory(job(), shape, Layout(micro_batch=1), 0)
    four = rank_memory(job(n=4), shape, Layout(dp_shard=2, cp=2, micro_batch=1), 0)
    assert four.optimizer == one.optimizer / 4
    layer = shape.layer_params
    assert four.parameters == 4 * PLAIN.num_params() / 4 + 2 * 2 * layer  # fp32 shard + two bf16 layers
    assert four.activations == one.activations / 2  # cp halves the tokens of each rank


def test_dense_residual_keeps_every_earlier_output_per_micro_batch_in_flight():
    dense = dataclasses.replace(PLAIN, dense_residual=True, n_layers=8)
    shape = shape_of(DEFAULT, dense, 128)
    lay = Layout(pp=4, schedule="1f1b", micro_batch=1)
    j = job(dense, n=4)
    # rank r runs layers 2r, 2r+1: keeps what it received (H_0 … H_2r, or H_2r and the 8 − 2r partial sums when
    # fewer: 1, 3, 5, 3 tensors) and its own 2 outputs, for 4 − r micro-batches in flight
    for rank in range(4):
        expect = (4 - rank) * [3, 5, 7, 5][rank] * dense.d_model * 128 * 2
        assert rank_memory(j, shape, lay, rank).dense_outputs == expect


def test_pipeline_boundary_carries_all_earlier_outputs_or_fewer_exact_partial_sums():
    assert [boundary_tensors(k, 8, dense_residual=False) for k in (2, 4, 6)] == [1, 1, 1]
    assert [boundary_tensors(k, 8) for k in (2, 4, 6)] == [3, 5, 3]  # H_0 … H_k, or H_k and 8 − k partial sums


@pytest.mark.parametrize(("schedule", "p", "m", "bubble"), [
    ("gpipe", 4, 8, 3 / 11), ("1f1b", 4, 8, 3 / 11), ("1f1b", 2, 2, 1 / 3), ("interleaved", 4, 8, 3 / 19)])
def test_pipeline_bubble_by_schedule(schedule, p, m, bubble):
    cfg = dataclasses.replace(PLAIN, n_layers=8)
    j = job(cfg, n=p, batch=m)
    e = estimate(j, shape_of(DEFAULT, cfg, 128), Layout(pp=p, schedule=schedule, micro_batch=1))
    # the last stage also runs the head, so the bubble is measured against the slowest stage: still (p−1)/(m+p−1)
    assert e.bubble == pytest.approx(bubble)


def test_in_flight_micro_batches_by_schedule():
    assert [in_flight(Layout(pp=4, schedule="1f1b"), 8, r) for r in range(4)] == [4, 3, 2, 1]
    assert in_flight(Layout(pp=4, schedule="gpipe"), 8, 3) == 8
    assert in_flight(Layout(pp=4, schedule="interleaved"), 8, 0) == (2 * 3 + 4 + 1) / 2  # torch's warm-up


def test_traffic_by_dimension_matches_hand_counts():
    shape = shape_of(DEFAULT, PLAIN, 128)
    params = PLAIN.num_params()
    fsdp = estimate(job(n=2, batch=2), shape, Layout(dp_shard=2, micro_batch=1)).traffic
    # one micro-batch: weights gathered forward and backward in bf16, gradients reduce-scattered in fp32, half each
    assert fsdp.fsdp == pytest.approx((2 * 2 + 4) * params / 2)
    assert fsdp.tp == fsdp.pp == fsdp.cp == fsdp.dp_replicate == 0
    hsdp = estimate(job(n=4, batch=4), shape, Layout(dp_replicate=2, dp_shard=2, micro_batch=1)).traffic
    assert hsdp.dp_replicate == pytest.approx(2 * 0.5 * 4 * params / 2)  # all-reduce of the fp32 shard
    tp = estimate(job(n=2, batch=1), shape, Layout(tp=2, micro_batch=1)).traffic
    regions = PLAIN.n_layers * 2 + 1 + 1  # attention and MLP per layer, the head, the embedding
    assert tp.tp == pytest.approx(regions * 4 * 128 * PLAIN.d_model * 2 / 2)
    cp = estimate(job(n=2, batch=1), shape, Layout(cp=2, micro_batch=1)).traffic
    assert cp.cp == pytest.approx(PLAIN.n_layers * 2 * 128 * 2 * PLAIN.kv_dim * 2 / 2)  # K and V, forward + back
    pp = estimate(job(n=2, batch=4), shape, Layout(pp=2, schedule="1f1b", micro_batch=1)).traffic
    assert pp.pp == pytest.approx(4 * 2 * 128 * PLAIN.d_model * 2)  # 4 micro-batches, activation + gradient


def test_layer_activation_count_matches_what_autograd_saves():
    """The per-layer activation elements the memory model counts are within 10% of the tensors autograd keeps for
    a real block's backward pass (plain and TransformerX)."""
    torch = pytest.importorskip("torch")
    from kunlunbaize.model import KunlunBaize

    def saved(cfg: ModelConfig) -> int:
        torch.manual_seed(0)
        model = KunlunBaize(cfg)
        storages: dict[int, int] = {}
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                storages[ptr] = max(storages.get(ptr, 0), t.untyped_storage().nbytes())
            return t

        x = torch.randint(0, cfg.vocab_size, (2, 64))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, labels=x, logits=False)
        return sum(storages.values())

    for switches in ({"transformerx": False}, {}):
        base = dict(dense_residual=False, mtp_depth=0, **switches)
        one, three = (saved(ModelConfig.preset("tiny", n_layers=n, **base)) for n in (1, 3))
        measured = (three - one) / 2 / (2 * 64 * 4)
        counted = layer_activations(ModelConfig.preset("tiny", **base))
        assert counted == pytest.approx(measured, rel=0.10), switches


# --- layouts refused, with the reason ------------------------------------------------------------------------

@pytest.mark.parametrize(("layout", "reason"), [
    (Layout(tp=3, dp_shard=1), "n_heads=4 not divisible by tp=3"),
    (Layout(pp=4, schedule="1f1b", micro_batch=1), "n_layers=2 fewer than the 4 pipeline stages"),
    (Layout(cp=3), "seq_len=128 not divisible by 2·cp=6"),
    (Layout(dp_shard=3), "global batch 8 not divisible by dp=3"),
    (Layout(tp=16), "tp=16 spans more than a node of 8 GPUs"),
    (Layout(pp=2, schedule="1f1b", micro_batch=8), "1 micro-batches for 2 stages"),
    (Layout(dp_shard=2, micro_batch=3), "micro-batch 3 does not divide the 4 sequences per rank"),
])
def test_invalid_layouts_are_refused_with_the_reason(layout, reason):
    problems = layout_problems(job(TINY, n=layout.world), layout)
    assert any(reason in p for p in problems), problems


def test_plan_lists_only_valid_fitting_layouts_and_says_why_meshes_were_left_out():
    result = plan(job(TINY, n=6, batch=12))
    assert result.best is not None
    assert all(not layout_problems(result.job, e.layout) and e.fits for e in result.fitting)
    speeds = [e.tokens_per_gpu for e in result.fitting]
    assert speeds == sorted(speeds, reverse=True)
    reasons = dict(result.excluded)
    assert "n_heads=4 not divisible by tp=3" in reasons["1×1×3×1×2"]
    assert "n_layers=2 fewer than the 3 pipeline stages" in reasons["1×2×1×3×1"]


def test_a_layout_too_big_for_the_gpu_is_left_out_as_out_of_memory():
    result = plan(job(ModelConfig.preset("paper"), n=8, seq=4096, batch=8))
    assert result.best is None
    assert any("out of memory" in why for _, why in result.excluded)


def test_paper_preset_plan_at_scale_has_a_best_layout_with_every_figure():
    result = plan(job(ModelConfig.preset("paper"), n=2048, seq=4096, batch=1024), fixed={"tp": 8, "cp": 1},
                  schedules=("1f1b",), micro_batches=(1,), ac_modes=("full",))
    best = result.best
    assert best is not None and best.layout.pp > 1 and best.memory.dense_outputs > 0
    assert 0 < best.mfu < 1 and 0 < best.bubble < 1 and math.isfinite(best.days_for_paper)
    assert best.traffic.pp > 0 and best.traffic.tp > 0 and best.traffic.fsdp > 0


# --- calibration ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ref", REFERENCES, ids=[r.name.split(" (")[0] for r in REFERENCES])
def test_calibration_against_published_runs_is_within_30_percent(ref):
    ratio = predict(ref).tokens_per_gpu / ref.tokens_per_gpu
    assert 1 - TOLERANCE <= ratio <= 1 + TOLERANCE, f"{ref.name}: predicted ÷ published = {ratio:.2f}"


# --- command line --------------------------------------------------------------------------------------------

def run_plan(capsys, *args: str) -> tuple[int, str, str]:
    from kunlunbaize.cli import main

    try:
        main(["plan", *args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if isinstance(e.code, str):
            print(e.code, file=__import__("sys").stderr)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_prints_the_layouts_and_the_best_ones_breakdown(capsys):
    code, out, _ = run_plan(capsys, "--preset", "tiny", "--gpus", "4", "--batch", "16", "--top", "3")
    assert code == 0
    for text in ("layouts fit", "best:", "dense outputs", "pipeline bubble", "MFU", "days for the paper's 12.3T"):
        assert text in out


def test_cli_json_and_verbose(capsys):
    code, out, _ = run_plan(capsys, "--preset", "tiny", "--gpus", "4", "--batch-tokens", "2048", "--json")
    data = json.loads(out)
    assert code == 0 and data["job"]["batch"] == 16 and data["best"]["mfu"] > 0
    assert set(data["best"]["traffic_bytes_per_step"]) == {"fsdp", "dp_replicate", "tp", "pp", "cp"}
    code, out, _ = run_plan(capsys, "--preset", "tiny", "--gpus", "8", "--batch", "16", "-v")
    assert code == 0 and "left out" in out and "n_layers=2 fewer than the 8 pipeline stages" in out


def test_cli_reads_a_config_file(capsys, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(PLAIN.to_json())
    code, out, _ = run_plan(capsys, "--config", str(path), "--gpus", "2", "--batch", "4", "--json")
    assert code == 0 and json.loads(out)["job"]["params"] == PLAIN.num_params()


@pytest.mark.parametrize(("args", "message"), [
    (["--gpu", "X100"], "kunlun plan: --gpu: unknown GPU type 'X100': one of A100, H100, H200, B200"),
    (["--gpus", "12"], "kunlun plan: --gpus 12 is not a whole number of 8-GPU nodes"),
    (["--gpus", "0"], "kunlun plan: argument --gpus: expected an integer >= 1, got 0"),
    (["--batch-tokens", "1000"], "--batch-tokens 1,000 is not a whole number of 128-token sequences"),
    (["--config", "/nonexistent/config.json"], "--config /nonexistent/config.json: cannot read it"),
])
def test_cli_bad_input_is_one_line_usage_error(capsys, args, message):
    code, _, err = run_plan(capsys, "--preset", "tiny", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_cli_no_layout_is_one_line_failure(capsys):
    code, _, err = run_plan(capsys, "--preset", "tiny", "--gpus", "7", "--batch", "8")
    assert code == 1 and err.strip() == ("kunlun plan: no layout of 7 GPUs fits this job (-v says why each mesh "
                                         "was left out)")
