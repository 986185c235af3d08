"""bench.py: its rows on a tiny shape and a trained checkpoint, with and without top-k memory, and its refusals."""

import importlib.util
import json

import pytest

import bench
import convert_weights
from conftest import ROOT
from test_bad_input import exits_with_one_error_line


def bench_summary(capsys, *argv) -> dict:
    bench.main(["--device", "cpu", "--repeats", "1", *argv])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("topk", [[], ["--mem-topk", "64"], ["--mem-topk", "64", "--mem-retrieval", "exact"]])
def test_bench_times_prefill_and_decode_of_a_tiny_shape_with_two_memory_layers(capsys, topk):
    summary = bench_summary(capsys, "--preset", "tiny", "--mem-layers", "1,2", "--prefill", "2048",
                            "--decode-memory", "1024", *topk)
    prefill, decode = summary["rows"]
    assert (prefill["work"], prefill["tokens"], decode["work"], decode["memory"]) == ("prefill", 2048, "decode", 1024)
    assert prefill["seconds"] > 0 and decode["seconds"] > 0 and prefill["passkey"] is None
    assert summary["memory"] == ("all of memory attended" if not topk else
                                 "top 64 (blocks, blocks of 64)" if len(topk) == 2 else "top 64 (exact)")


def test_bench_of_a_trained_checkpoint_reads_passkey_prompts_and_checks_the_answers(capsys):
    summary = bench_summary(capsys, "--ckpt", str(ROOT / "models" / "fot3"), "--prefill", "1024,4096",
                            "--decode-memory", "", "--mem-topk", "128")
    assert [row["passkey"] for row in summary["rows"]] == [True, True]
    assert summary["shape"].endswith("fot3")


def test_bench_adds_llama_cpp_rows_for_the_same_gguf_where_the_package_is_installed(capsys, tmp_path):
    """The llama.cpp rows are optional: timed where llama_cpp is installed, a note where it is not."""
    ckpt = str(ROOT / "models" / "fot3")
    convert_weights.main([ckpt, str(tmp_path / "fot3.gguf"), "--to", "gguf", "--type", "q8_0"])
    capsys.readouterr()
    bench.main(["--device", "cpu", "--repeats", "1", "--ckpt", ckpt, "--prefill", "256", "--decode-memory", "0",
                "--quantize", "int8", "--llama-cpp", str(tmp_path / "fot3.gguf")])
    out = capsys.readouterr().out
    rows = [row for row in json.loads(out.strip().splitlines()[-1])["rows"] if row["kernel"] == "llama.cpp"]
    if importlib.util.find_spec("llama_cpp") is None:
        assert rows == [] and "no llama.cpp rows: the llama_cpp package is not installed" in out
    else:
        assert [(row["work"], row.get("tokens")) for row in rows] == [("prefill", 256), ("decode", None)]
        assert all(row["seconds"] > 0 for row in rows)


@pytest.mark.parametrize("argv,message", [
    (["--llama-cpp", "no/such.gguf"], "--llama-cpp no/such.gguf: no such file"),
    (["--llama-cpp", str(ROOT / "README.md")], "README.md: not a readable GGUF file"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--kernel", "fast"], "--kernel must be one or more of fused, plain"),
    (["--prefill", "0"], "--prefill must be positive token counts"),
    (["--prefill", "4k"], "--prefill, --decode-memory and --mem-layers take comma-separated integers"),
    (["--decode-memory", "-5"], "--decode-memory must be token counts >= 0"),
    (["--mem-layers", "9", "--preset", "tiny"], "config: mem_layers must be a list of distinct layer indices"),
    (["--mem-topk", "0", "--preset", "tiny"], "config: mem_topk must be null or a positive integer"),
    (["--mem-retrieval", "exact"], "--mem-retrieval and --mem-block-size choose how --mem-topk retrieves"),
    (["--ckpt", "no/such/dir"], "checkpoint directory no/such/dir does not exist"),
    (["--device", "tpu"], "device 'tpu': expected cpu, cuda or cuda:N"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    # a shape besides --ckpt's or --small's own would be silently dropped
    (["--ckpt", str(ROOT / "models" / "fot3"), "--layers", "2"], "--ckpt times a shape of its own: no --layers"),
    (["--ckpt", str(ROOT / "models" / "fot3"), "--preset", "tiny"], "--ckpt times a shape of its own: no --preset"),
    (["--small", "--preset", "tiny"], "--small times a shape of its own: no --preset with it"),
    (["--small", "--ckpt", str(ROOT / "models" / "fot3")], "--small times a shape of its own: no --ckpt with it"),
    (["--ckpt", str(ROOT / "models" / "fot3"), "--prefill", "64"],
     "--prefill 64: a checkpoint reads passkey prompts, the shortest of 134 tokens"),
])
def test_bad_bench_arguments_end_in_one_line(capsys, argv, message):
    assert message in exits_with_one_error_line(capsys, bench.main, argv)
