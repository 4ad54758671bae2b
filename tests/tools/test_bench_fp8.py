"""The fp8 benchmark's dry run on the CPU: every part runs on a tiny model and writes its figures."""

import json
import subprocess
import sys


def test_a_dry_run_writes_every_part(tiny_model_dir, tmp_path) -> None:
    out = tmp_path / "fp8.json"
    command = [
        sys.executable, "-m", "voxtral_run.tools.bench_fp8", "--device", "cpu", "--model", str(tiny_model_dir),
        "--positions", "120", "--full-streams", "1,2", "--paced-seconds", "0.5", "--json", str(out),
    ]  # fmt: skip
    subprocess.run(command, check=True, timeout=300, capture_output=True)
    figures = json.loads(out.read_text())
    assert set(figures) == {"gpu", "torch", "logits", "memory", "steps", "full"}
    assert figures["logits"]["cache_write_bits_equal_quantize"]
    assert set(figures["logits"]) >= {"bf16_vs_fp32", "fp8_kv", "fp8_weights", "fp8_kv_and_weights"}
    assert figures["memory"]["fp8"]["GB_per_stream"] < figures["memory"]["bf16"]["GB_per_stream"]
    assert figures["full"]["real_time"] in (0, 1, 2)
