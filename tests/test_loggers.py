"""Image loggers (folder gallery, tensorboard, wandb offline) and the TRL-style image hook with every tracker."""

import glob
import html
import json
import os
import re
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alignprop_core import AlignPropTrainer, plugins
from alignprop_core.errors import PluginError
from alignprop_core.image_loggers import FolderLogger, ImageLogSink, as_pil_list

CHROMIUM = "/usr/bin/chromium"


def image_outputs_hook(image_data, global_step, accelerate_logger):
    # TRL's documented example hook, verbatim: it must run unchanged with every tracker and with none.
    result = {}
    images, prompts, rewards = [image_data['images'], image_data['prompts'], image_data['rewards']]
    for i, image in enumerate(images):
        pil = Image.fromarray((image.cpu().numpy().transpose(1, 2, 0) * 255).astype(np.uint8))
        pil = pil.resize((256, 256))
        result[f"{prompts[i]:.25} | {rewards[i]:.2f}"] = [pil]
    accelerate_logger.log_images(result, step=global_step)


class ImageSources(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources, self.links = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.sources.append(attrs["src"])
        if tag == "a" and not attrs.get("href", "#").startswith("#"):
            self.links.append(attrs["href"])


def html_references(page: Path):
    parser = ImageSources()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser.sources, parser.links


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """wandb without network or account: offline mode, every folder it writes under tmp."""
    wandb = pytest.importorskip("wandb")
    wandb.teardown()  # wandb reads its environment once per process setup: start a fresh one with this test's
    root = tmp_path / "wandb-home"
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        (root / name).mkdir(parents=True)
        monkeypatch.setenv(name, str(root / name))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    yield root / "WANDB_DIR"
    wandb.teardown()


def wandb_run_files(wandb_dir: Path) -> Path:
    runs = sorted(glob.glob(str(wandb_dir / "**" / "offline-run-*"), recursive=True))
    assert len(runs) == 1, runs
    return Path(runs[0]) / "files"


def tensorboard_events(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    events.Reload()
    return events


def decode(encoded: bytes) -> Image.Image:
    import io

    return Image.open(io.BytesIO(encoded))


@pytest.fixture(scope="module")
def logged_run(tiny_sd_path, tmp_path_factory):
    """One 2-step training run with all three image loggers (wandb offline); the tests below read its outputs."""
    from alignprop_core import AlignPropConfig

    wandb = pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    root = tmp_path_factory.mktemp("logged-run")
    with pytest.MonkeyPatch.context() as env:
        for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true"}.items():
            env.setenv(name, value)
        for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            (root / name).mkdir()
            env.setenv(name, str(root / name))
        wandb.teardown()
        config = AlignPropConfig(
            pretrained_model=str(tiny_sd_path), rewards=["saturation:1", "contrast:0.5"], num_epochs=2,
            sample_num_steps=3, train_batch_size=2, truncation="fixed", truncation_k=1, mixed_precision="no",
            eval_num_samples=0, output_dir=str(root / "out"), save_freq=100,
            image_loggers=[{"name": "folder", "options": {"title": "demo run"}}, "tensorboard",
                           {"name": "wandb", "options": {"project": "alignprop-test"}}])
        trainer = AlignPropTrainer(config)
        trainer.train()
        wandb.teardown()
    return trainer.output_dir, root / "WANDB_DIR"


# ---------------------------------------------------------------------- folder gallery


def test_folder_logger_writes_pngs_jsonl_and_a_gallery_of_existing_images(logged_run):
    output_dir, _ = logged_run
    root = output_dir / "images"
    records = [json.loads(line) for line in (root / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 1, 2, 2]
    assert set(records[0]["rewards"]) == {"saturation", "contrast"}
    assert records[0]["reward"] == pytest.approx(records[0]["rewards"]["saturation"]
                                                 + 0.5 * records[0]["rewards"]["contrast"], rel=1e-5)
    steps = [json.loads(line) for line in (root / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2] and "contrast_mean" in steps[0]
    for record in records:
        assert Image.open(root / record["file"]).size == (128, 128)

    page = root / "index.html"
    sources, links = html_references(page)
    fixed = [json.loads(line)["file"] for line in (root / "fixed.jsonl").open()] if (root / "fixed.jsonl").exists() \
        else []  # the fixed-prompt strip, when the trainer renders one
    assert sorted(sources) == sorted([r["file"] for r in records] + fixed)  # every logged image, nothing else
    assert all((root / s).is_file() for s in sources + links)
    text = page.read_text()
    assert "demo run" in text and "saturation" in text and "contrast" in text and "<script" not in text
    for record in records:
        assert record["prompt"] in text and f"{record['rewards']['saturation']:.4f}" in text
    assert text.index('id="step-2"') < text.index('id="step-1"')  # newest first
    assert "<svg" in text  # the reward curve over steps

    # the gallery is rebuilt from what exists: a deleted image disappears from the page
    (root / records[0]["file"]).unlink()
    FolderLogger(str(output_dir)).write_gallery()
    sources, _ = html_references(page)
    assert records[0]["file"] not in sources and len(sources) == 3 + len(fixed)


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs /usr/bin/chromium (apt-get install chromium)")
def test_gallery_renders_its_images_in_headless_chromium(tmp_path):
    logger = FolderLogger(str(tmp_path))
    generator = torch.Generator().manual_seed(0)
    for step in (1, 2, 3):
        logger({"images": torch.rand(2, 3, 64, 48, generator=generator), "prompts": ["a cat", "a <b>dog</b>"],
                "prompt_metadata": [{}, {}], "rewards": torch.tensor([0.5, 0.25]) * step,
                "reward_components": {"saturation": torch.tensor([0.5, 0.25]) * step}}, step)
    page = tmp_path / "images" / "index.html"
    # A copy with a probe script (the gallery itself has none) reports how many images actually decoded.
    probe = page.with_name("probe.html")
    probe.write_text(page.read_text().replace(' loading="lazy"', "").replace(
        "</body>", "<script>window.addEventListener('load', () => { const i = [...document.images]; "
        "document.title = 'loaded ' + i.filter(x => x.complete && x.naturalWidth > 0).length + '/' + i.length; "
        "});</script></body>"))
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'chrome'}",
             "--virtual-time-budget=5000"]
    result = subprocess.run(flags + ["--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert "<title>loaded 6/6</title>" in result.stdout, (result.stdout[:500], result.stderr[-2000:])
    assert "a &lt;b&gt;dog&lt;/b&gt;" in result.stdout  # prompts are escaped, not interpreted
    shot = tmp_path / "gallery.png"
    subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1200,900", page.as_uri()], capture_output=True,
                   timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (900, 1200) and pixels.std() > 10  # a rendered page, not a blank one


def write_run_files(output_dir: Path, steps=range(1, 7), after=True):
    """What the trainer leaves next to images/: the config and a metrics.jsonl with two rewards of very different
    scale, a null and a NaN (older runs) grad norm, and the eval rows."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "alignprop_config.yaml").write_text(
        "pretrained_model: alignprop:tiny-sd\nrewards:\n- name: saturation\n  weight: 1.0\n  options: {}\n"
        "- name: contrast\n  weight: 0.5\n  options: {}\nnum_epochs: 6\nlora_rank: 4\n")
    lines = [json.dumps({"step": 0, "eval": "before", "eval/reward_mean": 0.48, "eval/saturation_mean": 0.44,
                         "eval/contrast_mean": 0.08})]
    for step in steps:
        grad = None if step == 3 else (float("nan") if step == 4 else 0.5 / step)
        lines.append(json.dumps({"step": step, "reward_mean": 0.48 + 0.01 * step, "reward_std": 0.01,
                                 "loss": -0.48 - 0.01 * step, "grad_norm": grad, "k": 1 + step % 3,
                                 "step_time": 1.0 + 0.1 * step, "lr": 1e-3, "skipped_nonfinite": 0.0,
                                 "nonfinite_steps": 0.0, "reward/saturation_mean": 0.44 + 0.008 * step,
                                 "reward/saturation_std": 0.01, "reward/contrast_mean": 0.08 + 0.002 * step,
                                 "reward/contrast_std": 0.002}))
    lines.append("{\"step\": 7, \"loss\": ")  # a line cut short by an interrupted run
    if after:
        lines.append(json.dumps({"step": 6, "eval": "after", "eval/reward_mean": 0.55, "eval/saturation_mean": 0.5,
                                 "eval/contrast_mean": 0.1}))
    (output_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def log_steps(logger: FolderLogger, steps=(2, 4, 6), fixed: bool = True):
    generator = torch.Generator().manual_seed(0)
    for step in steps:
        image_data = {"images": torch.rand(2, 3, 16, 16, generator=generator), "prompts": ["a cat", "a dog"],
                      "prompt_metadata": [{}, {}], "rewards": torch.tensor([0.5, 0.25]),
                      "reward_components": {"saturation": torch.tensor([0.4, 0.2]),
                                            "contrast": torch.tensor([0.2, 0.1])}}
        if fixed:
            image_data["fixed"] = {"images": torch.rand(2, 3, 16, 16, generator=generator),
                                   "prompts": ["a fixed fox", "a fixed owl"], "seeds": [11, 12]}
        logger(image_data, step)


def charts(page_text: str) -> dict[str, ET.Element]:
    """{chart title: parsed <svg>} of every chart on a gallery page."""
    found = re.findall(r'<figure class="chart"><figcaption><b>(.*?)</b>.*?(<svg.*?</svg>)', page_text)
    return {html.unescape(title): ET.fromstring(svg) for title, svg in found}


def axis_labels(svg: ET.Element, axis: str) -> list[str]:
    (group,) = [g for g in svg.iter("g") if g.get("class") == axis]
    return [text.text for text in group.iter("text")]


def series_points(svg: ET.Element) -> int:
    (line,) = svg.iter("polyline")
    return len(line.get("points").split())


def test_gallery_charts_every_series_on_its_own_labelled_axes(tmp_path):
    write_run_files(tmp_path)
    logger = FolderLogger(str(tmp_path))
    log_steps(logger)
    logger.close()
    found = charts((tmp_path / "images" / "index.html").read_text())
    assert list(found) == ["reward (weighted)", "saturation", "contrast", "loss", "grad norm (before clipping)",
                           "K (backprop steps)", "step time (s)",
                           # every eval round (here before and after): training vs held-out rewards, diversity
                           "eval: weighted reward", "eval: saturation", "eval: contrast"]
    for title, svg in found.items():
        ticks = [float(label) for label in axis_labels(svg, "y-axis")]
        assert len(ticks) >= 3 and ticks == sorted(ticks) and len(set(ticks)) == len(ticks), (title, ticks)
        steps = [int(label) for label in axis_labels(svg, "x-axis")]
        assert len(steps) >= 2 and steps[0] <= 1 and steps[-1] >= 6, (title, steps)
    # each reward on its own scale, with the ticks bracketing its values: 0.08 no longer looks like 0.44
    contrast = [float(t) for t in axis_labels(found["contrast"], "y-axis")]
    saturation = [float(t) for t in axis_labels(found["saturation"], "y-axis")]
    assert contrast[0] <= 0.082 and 0.092 <= contrast[-1] < 0.2
    assert 0.3 < saturation[0] <= 0.448 and saturation[-1] >= 0.488
    # null and NaN grad norms are skipped; the other series have a point per step
    assert series_points(found["grad norm (before clipping)"]) == 4 and series_points(found["loss"]) == 6


def test_gallery_shows_config_eval_table_and_fixed_prompt_strip(tmp_path):
    write_run_files(tmp_path, after=False)
    logger = FolderLogger(str(tmp_path))
    log_steps(logger)
    root = tmp_path / "images"
    text = (root / "index.html").read_text()
    order = [text.index(f'id="{anchor}"') for anchor in ("config", "eval", "charts", "fixed", "samples", "step-6")]
    assert order == sorted(order)
    assert "<details>" in text and "lora_rank: 4" in text and "rewards saturation×1.0, contrast×0.5" in text

    # the strip: each fixed prompt at every logged step, oldest first, every image saved and referenced
    fixed = [json.loads(line) for line in (root / "fixed.jsonl").read_text().splitlines()]
    assert [(r["step"], r["index"], r["prompt"], r["seed"]) for r in fixed[:2]] == [(2, 0, "a fixed fox", 11),
                                                                                   (2, 1, "a fixed owl", 12)]
    assert sorted(p.name for p in (root / "fixed").glob("*.png")) == [f"step-{s:06d}-{i}.png" for s in (2, 4, 6)
                                                                       for i in (0, 1)]
    strip = text[text.index('id="fixed"'):text.index('id="samples"')]
    sources = re.findall(r'<img src="([^"]+)"', strip)
    assert sources == [f"fixed/step-{s:06d}-{i}.png" for i in (0, 1) for s in (2, 4, 6)]
    assert "a fixed fox" in strip and "seed 12" in strip and "step 4" in strip

    # the eval table: before only, until the trainer writes "after"; then before, after and the change
    def eval_rows(page: str) -> list[list[str]]:
        table = page[page.index('<table class="eval">'):page.index("</table>", page.index('<table class="eval">'))]
        return [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", table)[1:]]

    assert eval_rows(text) == [["saturation", "0.4400"], ["contrast", "0.0800"], ["weighted total", "0.4800"]]
    write_run_files(tmp_path, after=True)
    logger.close()  # the trainer's last call, after the final eval
    text = (root / "index.html").read_text()
    assert eval_rows(text) == [["saturation", "0.4400", "0.5000", "+0.0600"],
                               ["contrast", "0.0800", "0.1000", "+0.0200"],
                               ["weighted total", "0.4800", "0.5500", "+0.0700"]]
    assert "<script" not in text and "http" not in text.replace("http-equiv", "")  # no scripts, no network


def test_gallery_of_an_older_run_without_metrics_config_or_fixed_images(tmp_path):
    logger = FolderLogger(str(tmp_path))
    logger.close()  # nothing logged: nothing written
    assert not (tmp_path / "images" / "index.html").exists()
    log_steps(logger, fixed=False)
    root = tmp_path / "images"
    text = (root / "index.html").read_text()
    assert not (root / "fixed").exists() and 'id="fixed"' not in text
    assert 'id="eval"' not in text and 'id="config"' not in text
    # the charts fall back to the logged batches' means, still one per reward with real axes
    found = charts(text)
    assert list(found) == ["reward", "contrast", "saturation"]
    assert len(axis_labels(found["saturation"], "y-axis")) >= 3
    # a metrics.jsonl whose grad norm is always null: no grad norm chart, the rest as usual
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": -s / 10, "grad_norm": None})
                                                    + "\n" for s in (1, 2, 3)) + "not json\n")
    logger.write_gallery()
    assert list(charts((root / "index.html").read_text())) == ["loss"]


def test_gallery_fits_a_narrow_window(tmp_path):
    write_run_files(tmp_path)
    logger = FolderLogger(str(tmp_path))
    log_steps(logger)
    text = (tmp_path / "images" / "index.html").read_text()
    assert 'name="viewport" content="width=device-width' in text
    assert ".charts{display:flex;flex-wrap:wrap" in text and ".strip{display:flex;flex-wrap:wrap" in text
    # charts scale with the window (a viewBox, no fixed size); nothing is laid out wider than a 400 px window
    svgs = re.findall(r"<svg[^>]*>", text)
    assert svgs and all("viewBox=" in s and " width=" not in s and " height=" not in s for s in svgs)
    fixed_widths = [int(w) for w in re.findall(r"(?<![-\w])width:(\d+)px", text)]
    minimums = [int(w) for w in re.findall(r"(?:min-width:|minmax\()(\d+)px", text)]
    assert max(fixed_widths + minimums) <= 360
    assert "@media (max-width:" in text  # a narrow window gets smaller margins and columns
    assert "overflow-x:auto" in text  # wide content (the config, the eval table) scrolls inside its box


def test_chart_ticks_are_round_distinct_and_bracket_the_data():
    from alignprop_core.charts import _thin, nice_ticks, tick_labels

    for low, high in [(0.081, 0.093), (0.41, 0.46), (-0.46, -0.41), (1.0, 1.0), (0.0, 0.0), (3e-6, 4.2e-6),
                      (12.0, 48000.0), (2e6, 9e6), (-0.004, 0.003), (0.10001, 0.10004)]:
        ticks = nice_ticks(low, high)
        labels = tick_labels(ticks)
        slack = 1e-9 * (ticks[1] - ticks[0])  # float rounding of tick = i * step
        assert 3 <= len(ticks) <= 7 and ticks[0] <= low + slack and ticks[-1] >= high - slack, (low, high, ticks)
        assert len(set(labels)) == len(labels), (low, high, labels)  # neighbours are told apart
        assert all(abs(float(label) - tick) <= abs(ticks[1] - ticks[0]) / 100 for label, tick in zip(labels, ticks))
        assert "-0.0" not in labels and "-0" not in labels
    assert nice_ticks(1, 3, integer=True) == [1, 2, 3]
    assert nice_ticks(7, 7, integer=True) == [6, 7, 8]
    # long runs are thinned for the page, keeping spikes
    points = [(s, 1.0) for s in range(5000)]
    points[1234] = (1234, 50.0)
    thinned = _thin(points)
    assert len(thinned) <= 620 and (1234, 50.0) in thinned and thinned == sorted(thinned)


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs /usr/bin/chromium (apt-get install chromium)")
def test_gallery_in_a_400px_chromium_window_has_no_horizontal_scroll(tmp_path):
    write_run_files(tmp_path)
    logger = FolderLogger(str(tmp_path))
    log_steps(logger)
    page = tmp_path / "images" / "index.html"
    # Headless Chromium will not make its window narrower than 500 px, so the page is shown in a 400 px iframe
    # (its media queries and layout follow the iframe's width) and measured from the outside.
    probe = page.with_name("probe.html")
    probe.write_text("<!doctype html><html><body style='margin:0'><iframe id='f' src='index.html' "
                     "style='width:400px;height:900px;border:0'></iframe><script>"
                     "document.getElementById('f').addEventListener('load', () => { "
                     "const w = document.getElementById('f').contentWindow; document.title = 'scroll ' + "
                     "w.document.documentElement.scrollWidth + ' of ' + w.innerWidth; });</script></body></html>")
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'chrome'}",
             "--allow-file-access-from-files", "--virtual-time-budget=5000", "--window-size=800,900"]
    result = subprocess.run(flags + ["--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r"<title>scroll (\d+) of (\d+)</title>", result.stdout)
    assert found, (result.stdout[:500], result.stderr[-2000:])
    assert int(found.group(1)) <= int(found.group(2)) <= 400  # the page fits: nothing sticks out to the right


# ---------------------------------------------------------------------- tensorboard


def test_tensorboard_logger_event_files_hold_the_images(logged_run):
    output_dir, _ = logged_run
    events = tensorboard_events(output_dir / "tensorboard")
    assert {"samples/0", "samples/1"} <= set(events.Tags()["images"])
    logged = events.Images("samples/1")
    assert [e.step for e in logged] == [1, 2] and (logged[0].width, logged[0].height) == (128, 128)
    # the event file holds the very pixels the folder logger saved for that step and index
    saved = np.asarray(Image.open(output_dir / "images" / "step-000002" / "001.png").convert("RGB"))
    assert np.abs(np.asarray(decode(logged[1].encoded_image_string).convert("RGB")).astype(int) - saved).max() <= 1
    captions = events.Tensors("samples/captions/text_summary")
    prompts = [json.loads(l)["prompt"] for l in (output_dir / "images" / "samples.jsonl").open()]
    assert prompts[0] in captions[0].tensor_proto.string_val[0].decode()
    assert [e.step for e in events.Scalars("samples/saturation_mean")] == [1, 2]


def test_seed_hook_runs_verbatim_with_tensorboard_tracking(tiny_config):
    pytest.importorskip("tensorboard")
    config = tiny_config(num_epochs=1, sample_num_steps=2, log_with="tensorboard", image_loggers=["tensorboard"])
    trainer = AlignPropTrainer(config, image_samples_hook=image_outputs_hook)
    trainer.train()
    events = tensorboard_events(trainer.output_dir / "logs" / "alignprop")  # logdir/tracker_project_name
    hook_tags = [t for t in events.Tags()["images"] if not t.startswith("samples/")]
    assert len(hook_tags) == 2, events.Tags()["images"]  # one per image, keyed by prompt and reward
    for tag in hook_tags:
        (event,) = events.Images(tag)
        assert (event.width, event.height) == (256, 256) and event.step == 1
        assert re.search(r" \| -?\d+\.\d\d$", tag), tag
    # the image logger writes into the same run as the tracker, next to the training scalars
    assert {"samples/0", "samples/1"} <= set(events.Tags()["images"])
    assert "reward_mean" in events.Tags()["scalars"]


# ---------------------------------------------------------------------- wandb (offline)


def test_wandb_logger_offline_run_holds_images_and_table(logged_run):
    output_dir, wandb_dir = logged_run
    files = wandb_run_files(wandb_dir)
    images = sorted((files / "media" / "images").glob("samples_*.png"))
    assert len(images) == 4 and all(Image.open(p).size == (128, 128) for p in images)
    tables = sorted((files / "media" / "table").glob("samples_table_*.table.json"))
    assert len(tables) == 2
    table = json.loads(tables[-1].read_text())
    assert table["columns"] == ["step", "image", "prompt", "reward", "saturation", "contrast"]
    records = [json.loads(l) for l in (output_dir / "images" / "samples.jsonl").open()]
    assert [row[2] for row in table["data"]] == [r["prompt"] for r in records if r["step"] == 2]
    assert [row[4] for row in table["data"]] == pytest.approx([r["rewards"]["saturation"] for r in records
                                                               if r["step"] == 2], rel=1e-5)


def test_seed_hook_runs_verbatim_with_wandb_tracking(tiny_config, offline_wandb):
    config = tiny_config(num_epochs=1, sample_num_steps=2, log_with="wandb", tracker_project_name="alignprop-test")
    trainer = AlignPropTrainer(config, image_samples_hook=image_outputs_hook)
    trainer.train()
    images = sorted((wandb_run_files(offline_wandb) / "media" / "images").glob("*.png"))
    assert len(images) == 2 and all(Image.open(p).size == (256, 256) for p in images)
    assert all(" | " in p.name for p in images)  # keyed like the hook's f"{prompt:.25} | {reward:.2f}"


# ---------------------------------------------------------------------- no tracker


def test_seed_hook_runs_verbatim_without_a_tracker_and_keeps_the_images(tiny_config):
    trainer = AlignPropTrainer(tiny_config(num_epochs=1, sample_num_steps=2), image_samples_hook=image_outputs_hook)
    trainer.train()
    hook_dir = trainer.output_dir / "images" / "hook"
    index = [json.loads(line) for line in (hook_dir / "images.jsonl").read_text().splitlines()]
    assert [r["step"] for r in index] == [1, 1]
    assert all(re.search(r" \| -?\d+\.\d\d$", r["key"]) for r in index)
    assert all(Image.open(hook_dir / r["file"]).size == (256, 256) for r in index)


def test_image_sink_accepts_what_hooks_pass(tmp_path):
    class Accelerator:
        trackers = []

    sink = ImageLogSink(Accelerator(), tmp_path)
    chw = torch.rand(3, 8, 6)
    pils = as_pil_list([chw, chw.permute(1, 2, 0).numpy(), (chw * 255).byte(), Image.new("L", (6, 8)),
                        torch.rand(2, 3, 8, 6)])
    assert len(pils) == 6 and all(p.size == (6, 8) and p.mode == "RGB" for p in pils)
    assert np.abs(np.asarray(pils[0]).astype(int) - np.asarray(pils[1]).astype(int)).max() == 0
    with pytest.raises(PluginError, match="log_images got a str"):
        as_pil_list("image.png")
    sink.log_images({"grid/a b": [chw, chw], "one": chw}, step=3)
    sink.log({"x": 1.0}, step=3)
    assert len(list((tmp_path / "step-000003").glob("*.png"))) == 3
    assert json.loads((tmp_path / "log.jsonl").read_text()) == {"step": 3, "x": 1.0}
    assert sink.tracker is None and sink.get_tracker("tensorboard") is None
    with pytest.raises(AttributeError, match="no tracker is configured: set log_with"):
        sink.writer

    class Custom:  # any accelerate tracker with log_images, e.g. comet_ml/aim: gets PIL lists, nothing saved
        name, tracker, writer = "custom", "the-run", "the-writer"
        received = {}

        def log_images(self, values, step=None):
            self.received.update(values)

    Accelerator.trackers = [Custom()]
    sink = ImageLogSink(Accelerator(), tmp_path / "unused")
    sink.log_images({"k": chw}, step=1)
    assert [p.size for p in Custom.received["k"]] == [(6, 8)] and not (tmp_path / "unused").exists()
    # what TRL hooks used on trackers[0] still works
    assert (sink.tracker, sink.writer, sink.name, sink.get_tracker("custom")) == ("the-run", "the-writer", "custom",
                                                                                   "the-run")


def test_missing_optional_packages_name_the_pip_command(tiny_config, monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tensorboard", "wandb") else real(name, *a))
    for name in ("tensorboard", "wandb"):
        message = (rf"image logger '{name}' needs the '{name}' package, which is not installed: pip install {name} "
                   rf"\(or pip install 'alignprop-core\[{name}\]'\)")
        with pytest.raises(PluginError, match=message):
            plugins.build("image logger", name, {}, output_dir=str(tmp_path))
        with pytest.raises(PluginError, match=rf"log_with: {name} needs the '{name}' package.*pip install {name}"):
            AlignPropTrainer(tiny_config(log_with=name))
