"""Replaying a benchmark's request log (``core.run_log``, written by ``bench.request_log``): the
deployment it records becomes the simulation's, and ``sim.validate`` puts the prediction next to
the measured figures."""

from __future__ import annotations

from adrenaline.bench.request_log import offload_settings
from adrenaline.core.profile import Curve, load_profile, save_profile
from adrenaline.core.run_log import Run, append_run, read_runs
from adrenaline.sim import replay
from adrenaline.sim.cli import parse
from adrenaline.sim.cluster import Deployment
from adrenaline.sim.cost import AnalyticCost
from adrenaline.sim.hardware import gpu
from adrenaline.sim.model import ModelSpec
from adrenaline.sim.profiled import ProfileCost, profile_of
from adrenaline.sim.run import Setup
from adrenaline.sim.validate import main as validate
from adrenaline.sim.workload import synthetic

MODEL = ModelSpec.load("llama-2-7b")
DEPLOYMENT = {
    "mode": "pd", "prefill": 1, "decode": 1, "page_size": 16, "max_running": 256, "chunk_budget": 2048,
    "decode_kv_tokens": 6000, "prefill_kv_tokens": 50000, "executor_kv_tokens": 30000, "concurrency": 24,
    "offload_policy": "none", "offload_ratio": 0.0, "max_offloaded": None, "tpot_slo_ms": None,
    "ttft_slo_ms": None, "offload": False,
}  # fmt: skip
OFFLOAD = {**DEPLOYMENT, "offload_policy": "static", "offload_ratio": 2.0, "offload": True}


def write_run_log(path, runs: dict[str, tuple[dict, dict]]) -> None:
    specs = synthetic("sharegpt", 80, rate=None, seed=7)
    reqs = [
        {"sent": i * 0.01, "input_len": s.input_len, "output_len": s.output_len, "ttft": 0.1, "finish": 1.0}
        for i, s in enumerate(specs)
    ][::-1]  # written out of send order
    for name, (dep, measured) in runs.items():
        append_run(path, Run(name, dep, measured, reqs))


def test_a_bench_run_sets_the_deployment_and_flags_given_still_win(tmp_path):
    log = tmp_path / "run.jsonl"
    write_run_log(log, {"plain PD": (DEPLOYMENT, {}), "PD + offload": (OFFLOAD, {})})
    args = parse(["--replay", str(log), "--run", "PD + offload", "--decode-kv-tokens", "4000"])
    assert (args.offload, args.offload_policy, args.offload_ratio) == (True, "static", 2.0)
    assert (args.concurrency, args.chunk_budget, args.executor_kv_tokens) == (24, 2048, 30000)
    assert args.decode_kv_tokens == 4000
    run = replay.pick(log, "plain PD")
    assert not parse(["--replay", str(log), "--run", "plain PD"]).offload
    specs = replay.specs(run)
    assert [s.input_len for s in specs] == [s.input_len for s in synthetic("sharegpt", 80, None, seed=7)]
    assert all(s.arrival is None for s in specs)  # the bench client is closed loop


def test_validate_replays_each_pd_run_on_its_deployment(tmp_path, capsys):
    """The oracle: the same simulation built by hand from the logged deployment. Its figures stored
    as 'measured', the validation's errors must be zero."""
    save_profile(profile_of(AnalyticCost(MODEL, gpu("a100-80g")), 0.5), tmp_path / "prof.json")
    specs = synthetic("sharegpt", 80, rate=None, seed=7)  # what the log holds, in send order
    cost = ProfileCost(load_profile(tmp_path / "prof.json"), MODEL, OFFLOAD["decode_kv_tokens"])
    dep = Deployment(chunk_budget=2048, decode_kv_tokens=6000, prefill_kv_tokens=50000,
                     executor_kv_tokens=30000, concurrency=24, offload=True)  # fmt: skip
    _, s = Setup(cost, dep, "static", 2.0).run(specs)
    assert s.finished == 80 and s.mean_offloaded > 0
    measured = {"output_throughput": s.output_tok_s, "median_tpot_ms": s.tpot_p50_ms,
                "mean_decode_batch": s.mean_decode_batch}  # fmt: skip
    single = {**DEPLOYMENT, "mode": "single"}
    log = tmp_path / "run.jsonl"
    write_run_log(log, {"single": (single, measured), "PD + offload": (OFFLOAD, measured)})
    validate(["--profile", str(tmp_path / "prof.json"), "--run", str(log), "--", "--model", "llama-2-7b"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| PD + offload |")]
    assert len(rows) == 1 and rows[0].count("(+0 %)") == 3, out
    assert "| single |" not in out and "largest error: 0 %" in out


def test_the_logged_offload_policy_is_what_the_runtime_parses_from_the_decode_flags():
    assert (
        offload_settings(["--max-total-tokens", "1024", "--attention-offload-ratio", "0"])["offload_policy"]
        == "none"
    )
    static = offload_settings(["--attention-offload-ratio", "4", "--max-offloaded-requests", "8"])
    assert (static["offload_policy"], static["offload_ratio"], static["max_offloaded"]) == ("static", 4.0, 8)
    aware = offload_settings(["--attention-offload-policy", "load-aware", "--tpot-slo-ms", "90"])
    assert (aware["offload_policy"], aware["offload_ratio"], aware["tpot_slo_ms"]) == (
        "load-aware",
        None,
        90.0,
    )


def test_run_log_format_round_trips(tmp_path):
    write_run_log(tmp_path / "run.jsonl", {"a": (DEPLOYMENT, {"x": 1}), "b": (OFFLOAD, {})})
    runs = read_runs(tmp_path / "run.jsonl")
    assert [(r.run, len(r.requests)) for r in runs] == [("a", 80), ("b", 80)] and runs[0].measured == {"x": 1}


def test_a_logged_client_and_router_are_charged_to_the_decode_cores_in_their_share(tmp_path):
    """They ran unpinned on all the machine's cores: the decode instance, on 1 of 2, pays half."""
    cpu = {"decode frontend": 0.3, "router": 0.4, "client": 0.2}
    dep = {**DEPLOYMENT, "cores": 2, "decode_cores": 1}
    log = tmp_path / "run.jsonl"
    write_run_log(log, {"measured": (dep, {"cpu_ms_per_token": cpu}), "older": (DEPLOYMENT, {})})
    assert abs(parse(["--replay", str(log), "--run", "measured"]).host_ms_per_token - 0.3) < 1e-9
    assert parse(["--replay", str(log), "--run", "older"]).host_ms_per_token == 0.0  # not measured
    flagged = parse(["--replay", str(log), "--run", "measured", "--host-ms-per-token", "0"])
    assert flagged.host_ms_per_token == 0.0


def test_streamed_tokens_cost_the_decode_step_their_front_end_and_host_cpu():
    prof = profile_of(AnalyticCost(MODEL, gpu("a100-80g")), 0.5)
    bare = ProfileCost(prof, MODEL, 6000)
    prof.frontend_ms_per_token = 0.25
    both = ProfileCost(prof, MODEL, 6000, host_ms_per_token=0.5)
    for rows in (1, 8, 64):
        assert abs(both.dense_time(rows) - bare.dense_time(rows) - rows * 0.75e-3) < 1e-12
    specs = synthetic("sharegpt", 60, rate=None, seed=3)
    dep = Deployment(chunk_budget=2048, decode_kv_tokens=6000, prefill_kv_tokens=50000, concurrency=16)
    _, fast = Setup(bare, dep, "static", 0.0).run(specs)
    _, slow = Setup(both, dep, "static", 0.0).run(specs)
    assert slow.tpot_p50_ms > fast.tpot_p50_ms and slow.output_tok_s < fast.output_tok_s


def test_a_prefill_instance_pinned_to_part_of_the_machine_prefills_at_that_part_s_rate(tmp_path):
    """The profile's prefill rate is measured with 0 and 1 of its 2 cores held away; a prefill
    instance on 1 core runs at the second whether its executor works or not."""
    prof = profile_of(AnalyticCost(MODEL, gpu("a100-80g")), 0.5)
    prof.executor_threads, prof.prefill_threads = 1, 1
    prof.prefill_interference = Curve([0, 1], [2000.0, 1000.0])
    whole, pinned = ProfileCost(prof, MODEL, 6000), ProfileCost(prof, MODEL, 6000, prefill_cores=1)
    assert whole.prefill_time(1000, 0) == 0.5 and whole.prefill_time(1000, 0, exec_share=0.3) == 1.0
    assert pinned.prefill_time(1000, 0) == pinned.prefill_time(1000, 0, exec_share=0.3) == 1.0
    log = tmp_path / "run.jsonl"
    write_run_log(log, {"pinned": ({**DEPLOYMENT, "prefill_cores": 1}, {}), "older": (DEPLOYMENT, {})})
    assert parse(["--replay", str(log), "--run", "pinned"]).prefill_cores == 1
    assert parse(["--replay", str(log), "--run", "older"]).prefill_cores is None


def test_a_tpot_the_client_could_not_measure_is_shown_but_not_judged():
    """All of a request's tokens in one chunk give the client a TPOT of 0: no figure to predict."""
    from adrenaline.sim.validate import comparable

    assert not comparable("median_tpot_ms", 0.007) and comparable("median_tpot_ms", 30.7)
    assert comparable("output_throughput", 0.5) and comparable("mean_decode_batch", 0.9)
