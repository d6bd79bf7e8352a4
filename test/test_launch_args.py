"""``python -m adrenaline.launch_server`` flags: SGLang's parser, our defaults, clear refusals."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sglang.srt.server_args")

from adrenaline.launch_server import parse_server_args  # noqa: E402
from adrenaline.server.args import engine_config  # noqa: E402


def test_unset_flags_keep_our_defaults(default_model):
    sa, ours = parse_server_args(["--model-path", default_model])
    assert (ours.pd_transport, ours.pd_timeout) == ("tcp", 60.0)
    cfg = engine_config(sa)
    # SGLang would resolve these to page 1, 71% of memory, chunk 4096.
    assert (cfg.page_size, cfg.chunked_prefill_size) == (16, 2048)
    assert cfg.max_total_tokens is None and cfg.enable_prefix_caching
    gpu = torch.cuda.is_available()
    assert (cfg.device, cfg.attention_backend) == (("cuda", "flashinfer") if gpu else ("cpu", "torch"))


def test_set_flags_reach_the_engine_config(default_model):
    sa, _ = parse_server_args(
        ["--model-path", default_model, "--dtype", "half", "--page-size", "32", "--max-total-tokens", "4096",
         "--chunked-prefill-size", "-1", "--max-running-requests", "7",
         "--attention-backend", "torch", "--disable-radix-cache"]
    )  # fmt: skip
    cfg = engine_config(sa)
    assert (cfg.dtype, cfg.page_size, cfg.max_total_tokens) == ("float16", 32, 4096)
    assert cfg.chunked_prefill_size == cfg.max_prefill_tokens  # -1: no chunking
    assert cfg.max_running_requests == 7
    assert cfg.attention_backend == "torch" and not cfg.enable_prefix_caching


def test_default_model_when_no_model_path(default_model):
    assert parse_server_args([])[0].model_path == default_model


def test_pd_flags(default_model):
    sa, ours = parse_server_args(
        ["--model-path", default_model, "--disaggregation-mode", "decode", "--pd-timeout", "5",
         "--pd-advertise-host", "10.0.0.7"]
    )  # fmt: skip
    assert sa.disaggregation_mode == "decode"
    assert (ours.pd_timeout, ours.pd_advertise_host) == (5.0, "10.0.0.7")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--tp-size", "2"], "--tp-size 2"),
        (["--attention-backend", "fa3"], "--attention-backend fa3"),
        (["--is-embedding"], "embedding"),
        (["--disaggregation-mode", "prefill", "--disaggregation-transfer-backend", "nixl"], "--pd-transport"),
        (["--pd-timeout", "0"], "--pd-timeout"),
        (["--pd-transport", "rdma"], "--pd-transport"),
        (["--no-such-flag"], "unrecognized arguments"),
    ],
)
def test_bad_flags_exit_with_a_short_message(default_model, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        parse_server_args(["--model-path", default_model, *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) <= 3


def test_gpu_flags_reach_the_config(default_model):
    sa, ours = parse_server_args(
        ["--model-path", default_model, "--attention-backend", "triton", "--disable-cuda-graph",
         "--executor-sm-percent", "30"]
    )  # fmt: skip
    cfg = engine_config(sa)
    assert (cfg.attention_backend, cfg.cuda_graph, ours.executor_sm_percent) == ("triton", False, 30)
    assert engine_config(parse_server_args(["--model-path", default_model])[0]).cuda_graph
