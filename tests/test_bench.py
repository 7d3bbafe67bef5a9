"""The benchmark scripts (bench/) keep working: their machinery on seconds-long runs, not their figures.

The TRL peer (bench/.peer-venv) is not installed in CI, so only alignprop's side runs here; the peer's side is
exercised by `bench/run.py` itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def test_sd15_configs_are_the_published_architecture():
    """The GPU mode's random-init SD 1.5 has the published parameter counts (built on the meta device: no memory)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, str(BENCH))
    try:
        from pipelines import _config
    finally:
        sys.path.remove(str(BENCH))
    with torch.device("meta"):
        unet = UNet2DConditionModel(**_config("unet"))
        vae = AutoencoderKL(**_config("vae"))
        text = CLIPTextModel(CLIPTextConfig(**_config("text_encoder")))

    def millions(model):
        return round(sum(p.numel() for p in model.parameters()) / 1e6, 1)

    assert (millions(unet), millions(vae), millions(text)) == (859.5, 83.7, 123.1)
    assert unet.config.sample_size * 8 == vae.config.sample_size == 512


@pytest.mark.slow
def test_run_smoke_writes_results_plots_and_summary(tmp_path):
    """`bench/run.py --smoke` (3 sampling steps) runs memory_vs_k, alignprop's side of sample_efficiency and limits
    end to end: fresh worker processes, LoRAs saved and scored by the common evaluator, JSON + PNG + summary written."""
    results = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "--smoke", "--only",
                           "memory_vs_k,sample_efficiency,limits",
                           "--results", str(results), "--work", str(tmp_path / "work"),
                           "--peer", str(tmp_path / "no-peer")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    memory = json.loads((results / "memory_vs_k-smoke.json").read_text())
    rows = {(r["k"], r["ckpt"]): r for r in memory["rows"]}
    assert set(rows) == {(1, True), (3, True), (1, False), (3, False)}
    assert all(r["peak_mib"] > r["setup_mib"] > 0 and r["step_s"] > 0 for r in rows.values())
    assert rows[(3, True)]["k_drawn"] == [3] and rows[(1, False)]["k_drawn"] == [1]
    efficiency = json.loads((results / "sample_efficiency-smoke.json").read_text())
    ours = efficiency["curves"]["alignprop"]
    assert [p["images"] for p in ours] == [0, 2, 4]
    assert all(isinstance(p["reward"], float) for p in ours)
    assert ours[0]["reward"] != ours[-1]["reward"]  # the LoRA was trained, saved, loaded and changes the samples
    assert "error" in efficiency["runs"]["ddpo lr=0.01"]  # no peer here: reported, not faked
    limits = json.loads((results / "limits-smoke.json").read_text())["rows"]
    assert [r["family"] for r in limits] == ["sd"]
    assert limits[0]["k_drawn"] == {"1": [1, 1], "all": [2, 2]}  # the warm-up and one repeat, K as asked
    assert all(t > 0 for t in limits[0]["times_s"]["inference"] + limits[0]["times_s"]["1"])
    assert limits[0]["ratio"]["1"]["median"] == limits[0]["times_s"]["1"][0] / limits[0]["times_s"]["inference"][0]
    for name in ("memory_vs_k-smoke.png", "sample_efficiency-smoke.png", "limits-smoke.png", "summary-smoke.md"):
        assert (results / name).stat().st_size > 0
    summary = (results / "summary-smoke.md").read_text()
    assert "Peak memory vs truncation depth" in summary and "| alignprop |" in summary
    assert "| sd |" in summary and "training step / plain diffusers inference" in summary


def test_run_refuses_a_missing_peer_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "--only", "vs_trl", "--peer",
                           str(tmp_path / "nope")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "bash bench/setup.sh" in proc.stderr.strip().splitlines()[-1]


def test_gpu_cases_build_from_the_published_configs():
    """The GPU bench's real-size pipelines (SD 1.5, SDXL base, FLUX.1-dev, SD3.5-medium, FLUX.2 [klein] 4B,
    Qwen-Image, Z-Image-Turbo) build from the published configs (meta device, no weights), with the published
    parameter counts; an unknown model is one line, exit status 1."""
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_cases.py"), "--dry-run"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {row["model"]: row["params_b"] for row in map(json.loads, proc.stdout.splitlines())}
    assert list(rows) == ["sd15", "sdxl-base", "flux1-dev", "sd35-medium", "flux2-klein-4b", "qwen-image",
                          "z-image-turbo"]
    assert rows["sd15"] == {"unet": 0.86, "vae": 0.084, "text_encoder": 0.123}
    # SDXL base 1.0's published safetensors: UNet 2,567,463,684; text_encoder_2 (bigG + projection) 694,659,840
    assert rows["sdxl-base"] == {"unet": 2.567, "vae": 0.084, "text_encoder": 0.123, "text_encoder_2": 0.695}
    assert rows["flux1-dev"]["transformer"] == pytest.approx(11.90, abs=0.01)
    assert rows["flux1-dev"]["text_encoder_2"] == pytest.approx(4.76, abs=0.01)  # T5-XXL encoder
    assert set(rows["sd35-medium"]) == {"vae", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer"}
    # Published counts (safetensors totals quoted in public write-ups): klein 4B's transformer 3,875,544,576, its
    # Qwen3-4B 4,022,468,096 and VAE 84,046,115; Qwen-Image's transformer 20,430,401,088, Qwen2.5-VL-7B
    # 8,292,166,656, VAE 126,892,531; Z-Image-Turbo's transformer 6,154,908,736 (its Qwen3-4B as klein's).
    for model, part, billions in [("flux2-klein-4b", "transformer", 3.876), ("flux2-klein-4b", "text_encoder", 4.022),
                                  ("flux2-klein-4b", "vae", 0.084), ("qwen-image", "transformer", 20.430),
                                  ("qwen-image", "text_encoder", 8.292), ("qwen-image", "vae", 0.127),
                                  ("z-image-turbo", "transformer", 6.155), ("z-image-turbo", "text_encoder", 4.022)]:
        assert rows[model][part] == pytest.approx(billions, rel=0.01), (model, part)
    for model in ("flux2-klein-4b", "qwen-image", "z-image-turbo"):
        assert set(rows[model]) == {"vae", "text_encoder", "transformer"}
    bad = subprocess.run([sys.executable, str(BENCH / "gpu_cases.py"), "--dry-run", "--models", "flux2"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        "error: --models: unknown 'flux2'; choose from sd15, sdxl-base, flux1-dev, sd35-medium, flux2-klein-4b, "
        "qwen-image, z-image-turbo"]


def test_gpu_sh_dry_run_checks_that_every_case_builds(tmp_path):
    """`bench/gpu.sh --dry-run` on a machine without a GPU: the issue's cases in order (SD 1.5 512 px K=1 and K=50
    beside TRL, SDXL 1024 px, the five flow models at 512 then 1024 px), each built; TRL is marked as not running
    when its peer is missing. Bad options are one line, exit status 2."""
    proc = subprocess.run(["bash", str(BENCH / "gpu.sh"), "--dry-run", "--peer", str(tmp_path / "no-peer")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cases = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    labels = [c["case"] for c in cases]
    flow = ["flux1-dev", "sd35-medium", "flux2-klein-4b", "qwen-image", "z-image-turbo"]
    assert labels == ["alignprop sd15 512px K=1,all", "trl sd15 512px K=1", "trl sd15 512px K=all",
                      "alignprop sdxl-base 1024px K=1"] + [f"alignprop {m} {px}px K=1" for px in (512, 1024)
                                                            for m in flow]
    assert all(c["builds"] for c in cases)
    assert [c["runs"] != "yes" for c in cases] == [False, True, True] + [False] * 11
    (tmp_path / "a-file").write_text("")
    for argv in (["--budget-s", "nan"], ["--epochs", "0"], ["--results", str(tmp_path)],
                 ["--results", str(tmp_path / "a-file" / "sub" / "gpu.json")]):
        bad = subprocess.run(["bash", str(BENCH / "gpu.sh"), *argv], capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("bench/gpu.sh: error: --")
    no_gpu = subprocess.run(["bash", str(BENCH / "gpu.sh")], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert no_gpu.returncode == 2 and "--dry-run" in no_gpu.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_gpu_sh_smoke_keeps_its_budget_and_writes_the_results(tmp_path):
    """`bench/gpu.py --smoke` runs the plan's processes on the CPU with tiny pipelines: each alignprop row has a
    step time and, for the first K of a model, plain inference timed in the same process; the run stops starting
    cases when the budget is spent and lists them as skipped, within the budget."""
    results = tmp_path / "gpu-cuda.json"
    proc = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--smoke", "--budget-s", "60", "--epochs", "2",
                           "--results", str(results)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(results.read_text())
    assert record["elapsed_s"] <= 60 + 5  # the last process gets what is left of the budget, and the write
    rows = record["rows"]
    assert [(r["model"], r["k"]) for r in rows[:2]] == [("sd15", "1"), ("sd15", "all")]
    assert rows[0]["step_over_inference"] == pytest.approx(rows[0]["step_s"] / rows[0]["inference_s"])
    assert rows[1]["inference_s"] is None and all(r["step_s"] > 0 for r in rows)
    why = {s["case"]: s["why"] for s in record["skipped"]}
    assert why["trl sd15 512px K=1"] == "--smoke runs alignprop's side only"
    assert "alignprop z-image-turbo 1024px K=1" in why  # 14 processes do not fit into 60 s


def test_gpu_run_keeps_the_rows_of_a_process_stopped_by_the_budget():
    sys.path.insert(0, str(BENCH))
    try:
        import gpu
    finally:
        sys.path.remove(str(BENCH))
    row = {"model": "sd15", "size": 64, "k": "1", "step_s": 1.0}
    script = f"import json, time; print(json.dumps({row!r}), flush=True); time.sleep(60)"
    rows, error = gpu.run(gpu.Case("alignprop", "sd15", 64), [sys.executable, "-c", script], timeout=3)
    assert rows == [{"side": "alignprop", **row}]
    assert error == "stopped after 3 s: the time budget ran out"
    rows, error = gpu.run(gpu.Case("alignprop", "sd15", 64), [sys.executable, "-c", "raise SystemExit('boom')"],
                          timeout=30)
    assert rows == [] and error == "exit status 1: boom"


@pytest.mark.parametrize("spec, part", [("nope=1", "expected KEY=VALUE with KEY a config field"),
                                        ("compile_prefix", "expected KEY=VALUE"),
                                        ("fuse_lora_prefix=maybe", "fuse_lora_prefix: expected bool"),
                                        ("checkpoint_memory_budget_gb=-1", "checkpoint_memory_budget_gb: got -1.0"),
                                        ("compile_grad_calls=true nope=1", "expected KEY=VALUE with KEY a config"),
                                        ("", "expected KEY=VALUE"),
                                        ("gradient_checkpointing=false checkpoint_memory_budget_gb=4",
                                         "empty when gradient_checkpointing is false")])
def test_limits_refuses_a_bad_compare_in_one_line(spec, part):
    proc = subprocess.run([sys.executable, str(BENCH / "limits.py"), "--family", "sd", "--compare", spec],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and part in proc.stderr.strip().splitlines()[-1], proc.stderr[-500:]


@pytest.mark.parametrize("spec, part", [("nope=1", "--set: expected KEY=VALUE with KEY a config field"),
                                        ("compile_grad_calls=2", "compile_grad_calls: expected bool, got '2'")])
def test_ours_refuses_a_bad_set_in_one_line(spec, part, tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "ours.py"), "alignprop", "--pipeline", str(tmp_path), "--set",
                           spec], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and part in proc.stderr.strip().splitlines()[-1], proc.stderr[-500:]


def test_profile_step_reports_both_sides_and_their_attention_kernels():
    proc = subprocess.run([sys.executable, str(BENCH / "profile_step.py"), "--family", "sd", "--steps", "3", "--size",
                           "64", "--rows", "3", "--compare", "checkpoint_memory_budget_gb=100"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    inference, train = record["inference"], record["train_step"]
    assert 0 < inference["self_cpu_s"] < train["self_cpu_s"]  # the step does the inference's work and more
    assert not any("backward" in name for name in inference["attention_kernels_s"])
    assert any("backward" in name for name in train["attention_kernels_s"])  # K=all: every call has a backward
    assert 0 < train["attention_share"] < 1


def test_kernel_profile_sorts_the_seconds_by_kind_of_kernel():
    """bench/common.py's kernel_profile: each kind counted where it ran, backward apart, nothing where it did not."""
    import torch

    sys.path.insert(0, str(BENCH))
    try:
        from common import kernel_profile
    finally:
        sys.path.remove(str(BENCH))
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    conv = torch.nn.Conv2d(4, 8, 3, padding=1)

    def step():
        # (2, 2 heads, 256 tokens, 4): the last dimension contiguous, else torch's CPU SDPA takes the math path
        q = conv(x).flatten(2).transpose(1, 2).contiguous().view(2, 256, 2, 4).transpose(1, 2)
        out = torch.nn.functional.scaled_dot_product_attention(q, 2 * q, 3 * q) @ torch.randn(4, 4)
        out.sum().backward()

    profile = kernel_profile(step)
    kernels = profile["kernels_s"]
    assert set(kernels) == {"attention", "attention backward", "convolution", "convolution backward", "matmul"}
    assert all(seconds > 0 for seconds in kernels.values()), kernels
    assert sum(kernels.values()) < profile["self_cpu_s"]
    without = kernel_profile(lambda: conv(x).sum().backward())["kernels_s"]
    assert without["attention"] == without["attention backward"] == without["matmul"] == 0
    assert without["convolution"] > 0 and without["convolution backward"] > 0


def test_kernel_floor_is_alignprops_attention_and_convolution_seconds_over_trls_step(tmp_path):
    """bench/run.py's kernel floor, and the summary column that shows it (only where a profile was taken)."""
    sys.path.insert(0, str(BENCH))
    try:
        from plots import summary_markdown
        from run import kernel_floor
    finally:
        sys.path.remove(str(BENCH))
    kernels = {"attention": 3.0, "attention backward": 0.5, "convolution": 1.0, "convolution backward": 0.5,
               "matmul": 9.0}
    ours = {"step_s": 6.0, "peak_mib": 1.0, "profile": {"self_cpu_s": 6.0, "kernels_s": kernels}}
    trl = {"step_s": 8.0, "peak_mib": 1.0}
    assert kernel_floor(ours, trl) == 5.0 / 8.0  # matmul is not in it: compiling can fuse around those
    assert kernel_floor({"step_s": 6.0}, trl) is None and kernel_floor(ours, {"error": "x"}) is None

    def summary(case: dict) -> list[str]:
        record = {"benchmark": "vs_trl", "targets": {"time_ratio": 0.7, "peak_ratio": 0.8}, "device": "cpu",
                  "machine": {"cpu": "x", "cores": 2}, "plan": {"steps": 50, "batch": 2, "epochs": 4},
                  "cases": [{"pipeline": "tiny16", "reward": "saturation", "k": "1", "ours": ours, "trl": trl,
                             "time_ratio": 0.75, "peak_ratio": 1.0, **case}]}
        (tmp_path / "vs_trl.json").write_text(json.dumps(record))
        return [line for line in summary_markdown(tmp_path, "").splitlines() if line.startswith("| tiny16")]

    assert summary({"kernel_floor": kernel_floor(ours, trl)})[0].endswith("| 0.62 |")
    assert summary({})[0].endswith("| 1.00 ✗ |")  # no profile, no column


@pytest.mark.parametrize("script, args, part", [
    ("ours.py", ["alignprop", "--device", "cuda"], "--profile reads self CPU time"),
    ("peer_trl.py", ["alignprop", "--device", "cuda"], "--profile reads self CPU time"),
    ("ours.py", ["train"], "--profile profiles a training step of the alignprop mode: drop it with train"),
    ("peer_trl.py", ["ddpo"], "--profile profiles a training step of the alignprop mode: drop it with ddpo")])
def test_profile_is_refused_where_it_measures_nothing_in_one_line(script, args, part, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(BENCH / script), *args, "--pipeline", str(tmp_path), "--profile",
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and part in proc.stderr.strip().splitlines()[-1], proc.stderr[-500:]
    assert not out.exists()


@pytest.mark.parametrize("script, args, part", [
    ("limits.py", ["--ks", "1,abc"], "--ks: expected a positive number or 'all', got 'abc'"),
    ("limits.py", ["--repeats", "0"], "--repeats: expected an integer >= 1, got 0"),
    ("limits.py", ["--size", "100"], "resolution: got 100"),
    ("profile_step.py", ["--k", "-3"], "--k: expected a positive number or 'all', got '-3'"),
    ("profile_step.py", ["--steps", "0"], "sample_num_steps: got 0"),
    ("profile_step.py", ["--rows", "x"], "--rows: invalid positive_int value: 'x'")])
def test_bench_scripts_refuse_bad_numbers_in_one_line(script, args, part):
    proc = subprocess.run([sys.executable, str(BENCH / script), "--family", "sd", *args], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and part in proc.stderr.strip().splitlines()[-1], proc.stderr[-500:]


def test_vs_trl_rounds_lie_apart_and_their_paired_ratios_give_the_median(tmp_path):
    """bench/run.py's vs-TRL rounds: every case once per round (round 2 starts after round 1 ends), the profile only
    in round 1, each side's s/step the median over rounds, the time ratio the median of the paired ratios, None where
    a round failed; and the summary shows the rounds' range."""
    sys.path.insert(0, str(BENCH))
    try:
        import run
        from plots import summary_markdown
    finally:
        sys.path.remove(str(BENCH))

    seconds = iter([6.0, 10.0, 5.0, 20.0, 8.0, 10.0, 4.0, 10.0])  # ours, trl per call in call order

    class Recording:  # stands in for run.Runner: it records what would run, and reports made-up step times
        args = type("Args", (), {"device": "cpu"})()
        calls: list[tuple] = []

        def pipeline(self, kind):
            return tmp_path / kind

        def _record(self, side, argv):
            self.calls.append((side, argv[2], argv[6], "--profile" in argv))
            return {"step_s": next(seconds), "peak_mib": 100.0, "train_peak_mib": 50.0,
                    **({"profile": {"kernels_s": dict.fromkeys(run.FLOOR_KERNELS, 1.0)}} if "--profile" in argv
                       else {})}

        def ours(self, *argv, label="alignprop"):
            return self._record("ours", argv)

        def trl(self, *argv, label="trl"):
            return self._record("trl", argv)

    plan = {"cases": [("tiny16", "saturation")], "ks": ["1", "all"], "steps": 3, "batch": 1, "epochs": 2,
            "profile": True, "rounds": 2}
    data = run.bench_vs_trl(Recording(), plan)
    assert {call[1] for call in Recording.calls} == {str(tmp_path / "tiny16")}
    assert [(side, k, profiled) for side, _, k, profiled in Recording.calls] == [
        ("ours", "1", True), ("trl", "1", True), ("ours", "all", True), ("trl", "all", True),  # round 1, profiled
        ("ours", "1", False), ("trl", "1", False), ("ours", "all", False), ("trl", "all", False)]
    k1, kall = data["cases"]
    assert k1["time_ratio_rounds"] == [0.6, 0.8] and k1["time_ratio"] == pytest.approx(0.7)
    assert k1["ours"]["step_s"] == 7.0 and k1["trl"]["step_s"] == 10.0 and k1["ours"]["step_s_rounds"] == [6.0, 8.0]
    assert kall["time_ratio_rounds"] == [0.25, 0.4] and kall["time_ratio"] == pytest.approx(0.325)
    assert k1["kernel_floor"] == pytest.approx(4.0 / 10.0)  # round 1's kernels over TRL's median step
    failed = run.merge_rounds([{"ours": {"step_s": 1.0}, "trl": {"step_s": 2.0}}, {"ours": {"error": "x"},
                                                                                   "trl": {"step_s": 2.0}}])
    assert failed["time_ratio"] is None and failed["time_ratio_rounds"] == [0.5, None]
    (tmp_path / "vs_trl.json").write_text(json.dumps({
        **data, "benchmark": "vs_trl", "targets": {"time_ratio": 0.7, "peak_ratio": 0.8}, "device": "cpu",
        "machine": {"cpu": "x", "cores": 2}}))
    rows = [line for line in summary_markdown(tmp_path, "").splitlines() if line.startswith("| tiny16")]
    assert "| 0.70 (0.60–0.80) ✓ |" in rows[0] and "| 0.33 (0.25–0.40) ✓ |" in rows[1]
