"""Page rendering: the folder logger's gallery (``index.html``), the eval report's page and its PNG grid.

Plain data in, markup or a PIL image out: records, metrics rows, table rows and PIL images (nothing here reads or
writes files). The gallery's SVG charts are in :mod:`alignprop_core.charts`.
"""

from __future__ import annotations

import datetime
import html
from typing import Any, Iterable, Optional, Sequence

from alignprop_core.charts import charts_html, eval_series, metric_series
from alignprop_core.checkpoints import CONFIG_NAME, finite

# ---------------------------------------------------------------------- folder gallery


_CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f6f6f4;color:#222}
header{padding:16px 24px;background:#20242b;color:#eee}header h1{margin:0 0 4px;font-size:20px;word-break:break-word}
header p{margin:0;color:#bbb;font-size:13px}main{padding:8px 24px 40px;max-width:1600px}
h2{font-size:16px;margin:24px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h2 small{font-weight:normal;color:#666;margin-left:8px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:12px}
figure{margin:0;background:#fff;border:1px solid #ddd;border-radius:6px;overflow:hidden}
figure img{width:100%;display:block;image-rendering:auto;background:#ccc}
figcaption{padding:6px 8px;font-size:12px}figcaption .prompt{font-weight:600;margin-bottom:4px;word-break:break-word}
table.scores{border-collapse:collapse;width:100%}table.scores td{padding:1px 0}
table.scores td.v{text-align:right;font-variant-numeric:tabular-nums}
nav{font-size:12px;margin:12px 0;line-height:1.8}nav a{margin-right:6px;color:#2a5db0}
.charts{display:flex;flex-wrap:wrap;gap:12px}
.chart{flex:1 1 260px;max-width:420px;padding:4px 6px}.chart svg{display:block;width:100%;height:auto}
.chart figcaption{padding:2px 2px 4px}.chart .last{font-variant-numeric:tabular-nums;margin-left:6px}
.chart small{color:#666}
details{background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px 10px;margin-top:12px}
summary{cursor:pointer;font-size:13px;word-break:break-word}
pre{overflow-x:auto;max-width:100%;font-size:12px;margin:8px 0 2px}
.wide{overflow-x:auto;max-width:100%}
table.eval{border-collapse:collapse;background:#fff;font-size:13px}
table.eval th,table.eval td{border:1px solid #ddd;padding:4px 10px;text-align:right;font-variant-numeric:tabular-nums}
table.eval th:first-child,table.eval td:first-child{text-align:left}
.up{color:#1a7f37}.down{color:#c62828}
.fixed-row{margin-bottom:12px}.fixed-row .prompt{font-size:13px;font-weight:600;margin:4px 0;word-break:break-word}
.fixed-row small{font-weight:normal;color:#666}
.strip{display:flex;flex-wrap:wrap;gap:6px}.strip figure{width:112px;max-width:30%}
.strip figcaption{padding:2px 4px;text-align:center;font-variant-numeric:tabular-nums}
@media (max-width:560px){header,main{padding-left:10px;padding-right:10px}
.grid{grid-template-columns:repeat(auto-fill,minmax(140px,1fr));gap:8px}}
"""


def gallery_html(records: list[dict], title: str, refresh_seconds: int = 0, *, metrics: Optional[list[dict]] = None,
                 evals: Optional[list[dict]] = None, fixed: Optional[list[dict]] = None,
                 config_text: Optional[str] = None) -> str:
    """A self-contained HTML page (inline CSS and SVG, no scripts): the run config (collapsed), the eval
    before/after table, one chart per series (training ``metrics`` rows; without them each reward's batch mean over
    the logged ``records``), the ``fixed``-prompt strip across steps, then ``records`` grouped by step, newest first,
    each image with its prompt and every score. Each part is left out when its data is absent."""
    esc = html.escape
    steps: dict[int, list[dict]] = {}
    for record in records:
        steps.setdefault(int(record["step"]), []).append(record)
    components = sorted({name for r in records for name in r.get("rewards", {})})
    # the weighted total is shown when it is not simply the one reward
    names = components if len(components) == 1 else ["reward"] + components
    series = {**metric_series(metrics or []), **eval_series(evals or [])}
    chart_note = "per training step, from metrics.jsonl"
    if not series and len(steps) > 1:  # an older run or a logger used on its own: the logged batches' means
        series = {name: [(step, _mean([_score(r, name) for r in group])) for step, group in sorted(steps.items())]
                  for name in names}
        chart_note = "batch mean of the logged samples (no metrics.jsonl)"
    head = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            + (f'<meta http-equiv="refresh" content="{refresh_seconds}">' if refresh_seconds > 0 else "")
            + f"<style>{_CSS}</style></head><body>")
    updated = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    span = f"steps {min(steps)}–{max(steps)}" if steps else "no steps yet"
    parts = [head, f"<header><h1>{esc(title)}</h1><p>{len(records)} images from {len(steps)} logged steps "
             f"({span}); newest first; updated {updated}.</p></header><main>"]
    sections = [("config", "config", _config_html(config_text)), ("eval", "eval", _eval_table_html(evals or [])),
                ("charts", "charts", charts_html(series, chart_note)),
                ("fixed", "fixed prompts", _fixed_strip_html(fixed or []))]
    sections = [s for s in sections if s[2]]
    if sections and steps:
        parts.append("<nav>" + " · ".join(f'<a href="#{anchor}">{label}</a>' for anchor, label, _ in sections)
                     + ' · <a href="#samples">samples</a></nav>')
    parts += [body for _, _, body in sections]
    parts.append('<div id="samples"></div>')
    if steps:
        parts.append("<nav>steps: " + " ".join(f'<a href="#step-{s}">{s}</a>' for s in sorted(steps, reverse=True))
                     + "</nav>")
    for step in sorted(steps, reverse=True):
        group = steps[step]
        summary = " · ".join(f"{esc(name)} {_mean([_score(r, name) for r in group]):.4g}" for name in names
                             if any(_score(r, name) is not None for r in group))
        parts.append(f'<section id="step-{step}"><h2>step {step}<small>batch mean: {summary}</small></h2>'
                     '<div class="grid">')
        for record in group:
            rows = "".join(f'<tr><td>{esc(name)}</td><td class="v">{_score(record, name):.4f}</td></tr>'
                           for name in names if _score(record, name) is not None)
            src = esc(record["file"], quote=True)
            prompt = esc(str(record["prompt"]))
            parts.append(f'<figure><a href="{src}"><img src="{src}" alt="{prompt}" loading="lazy"></a>'
                         f'<figcaption><div class="prompt">{prompt}</div><table class="scores">{rows}</table>'
                         "</figcaption></figure>")
        parts.append("</div></section>")
    if not steps:
        parts.append("<p>No samples logged yet.</p>")
    parts.append("</main></body></html>\n")
    return "".join(parts)


def _score(record: dict, name: str) -> Optional[float]:
    return record.get("reward") if name == "reward" else record.get("rewards", {}).get(name)


def _mean(values: Iterable[Optional[float]]) -> float:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else float("nan")


def _config_html(text: Optional[str]) -> str:
    """The run's config YAML, collapsed, under a one-line summary of the fields that identify a run."""
    if not text:
        return ""
    import yaml

    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError:
        config = None
    facts = []
    if isinstance(config, dict):
        rewards = config.get("rewards")
        if isinstance(rewards, list):
            facts.append("rewards " + ", ".join(f"{r.get('name')}×{r.get('weight', 1)}" if isinstance(r, dict)
                                                else str(r) for r in rewards))
        labels = (("pretrained_model", "model"), ("num_epochs", "steps"), ("train_batch_size", "batch"),
                  ("train_learning_rate", "lr"), ("truncation", "truncation"), ("lora_rank", "LoRA rank"),
                  ("seed", "seed"))
        facts += [f"{label} {config[key]}" for key, label in labels if config.get(key) is not None]
    summary = " · ".join(html.escape(str(fact)) for fact in facts) or CONFIG_NAME
    return (f'<section id="config"><details><summary><b>run config</b> {summary}</summary>'
            f"<pre>{html.escape(text)}</pre></details></section>")


def _eval_table_html(evals: list[dict]) -> str:
    """The fixed-seed eval rows as a table: a row per reward, a column per eval (``before``/``after`` at their
    steps) and the change from the first to the last."""
    columns: dict[tuple[int, str], dict] = {}
    for row in evals:  # a rerun of the same eval (a resumed run) replaces the earlier one
        columns[(int(row["step"]), str(row.get("eval")))] = row
    if not columns:
        return ""
    ordered = [columns[key] for key in sorted(columns, key=lambda k: (k[0], k[1] != "before"))]
    ordered = ordered if len(ordered) <= 4 else [ordered[0], ordered[-1]]  # every round is charted (eval_series)
    names = list(dict.fromkeys(key[len("eval/"):-len("_mean")] for row in ordered for key in row
                               if key.startswith("eval/") and key.endswith("_mean")))
    components = [n for n in names if n != "reward"]
    # the weighted total only when it is not simply the one reward (as on the eval page)
    shown = components + (["reward"] if "reward" in names and len(components) != 1 else [])
    if not shown:
        return ""
    head = "".join(f'<th>{html.escape(str(r.get("eval")))}<br><small>step {int(r["step"])}</small></th>'
                   for r in ordered) + ("<th>change</th>" if len(ordered) > 1 else "")
    body = []
    for name in shown:
        values = [finite(r.get(f"eval/{name}_mean")) for r in ordered]
        cells = []
        for row, value in zip(ordered, values):
            std = finite(row.get(f"eval/{name}_std"))
            cells.append("<td>" + ("–" if value is None else f"{value:.4f}")
                         + (f" <small>± {std:.4f}</small>" if std is not None else "") + "</td>")
        if len(ordered) > 1:
            first, last = values[0], values[-1]
            if first is None or last is None:
                cells.append("<td>–</td>")
            else:
                change = last - first
                cells.append(f'<td class="{"up" if change > 0 else "down" if change < 0 else ""}">{change:+.4f}</td>')
        label = "weighted total" if name == "reward" and components else name
        body.append(f"<tr><td>{html.escape(label)}</td>{''.join(cells)}</tr>")
    return (f'<section id="eval"><h2>fixed-seed eval<small>the same prompts and noise each time</small></h2>'
            f'<div class="wide"><table class="eval"><thead><tr><th>reward</th>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div></section>")


def _fixed_strip_html(fixed: list[dict]) -> str:
    """One row per fixed prompt: its image at every logged step, oldest first, so progress reads left to right."""
    rows: dict[tuple, dict[int, dict]] = {}
    for record in fixed:  # a step logged twice (a resumed run) shows its newest image
        key = (record.get("index"), record.get("prompt"), record.get("seed"))
        rows.setdefault(key, {})[int(record["step"])] = record
    if not rows:
        return ""
    parts = ['<section id="fixed"><h2>fixed prompts across steps<small>the same prompt and noise at every logged '
             "step, oldest first</small></h2>"]
    for (_, prompt, seed), by_step in rows.items():
        seed_note = f" <small>seed {seed}</small>" if seed is not None else ""
        parts.append(f'<div class="fixed-row"><div class="prompt">{html.escape(str(prompt))}{seed_note}</div>'
                     '<div class="strip">')
        for step in sorted(by_step):
            src = html.escape(by_step[step]["file"], quote=True)
            parts.append(f'<figure><a href="{src}"><img src="{src}" alt="step {step}" loading="lazy"></a>'
                         f"<figcaption>step {step}</figcaption></figure>")
        parts.append("</div></div>")
    parts.append("</section>")
    return "".join(parts)


# ---------------------------------------------------------------------- eval page and table


#: the columns of the printed and the HTML table, in order
_TABLE_COLUMNS = ("model", "reward", "mean", "std", "min", "max", "delta_vs_base", "win_rate_vs_base")


def _format_cell(value: Any, column: str) -> str:
    """One table value as text: delta signed, win rate in percent, floats to 4 decimals, None as '-'."""
    if value is None:
        return "-"
    if column == "delta_vs_base":
        return f"{value:+.4f}"
    if column == "win_rate_vs_base":
        return f"{100 * value:.0f}%"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned text table."""
    columns = [c for c in _TABLE_COLUMNS if any(c in row for row in rows)]
    cells = [[_format_cell(row.get(c), c) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(columns, widths)))]
    lines += ["  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
              for r in cells]
    return "\n".join(lines)


def _shown_scores(names: Sequence[str]) -> list[str]:
    """Each reward, then the weighted total when it is not simply the one reward."""
    components = [n for n in names if n != "weighted_total"]
    return components + (["weighted_total"] if "weighted_total" in names and len(components) > 1 else [])


_COLUMN_TITLES = {"delta_vs_base": "Δ vs base", "win_rate_vs_base": "wins vs base"}


def score_table_html(rows: list[dict[str, Any]]) -> str:
    """The eval rows as an HTML ``<table>`` (the columns of the printed table), each reward's best mean in bold."""
    esc = html.escape
    columns = [c for c in _TABLE_COLUMNS if any(c in row for row in rows)]
    best = {}
    for row in rows:
        best[row["reward"]] = max(best.get(row["reward"], row["mean"]), row["mean"])
    several = len({row["model"] for row in rows}) > 1
    head = "".join(f'<th class="{"t" if c in ("model", "reward") else "n"}">{esc(_COLUMN_TITLES.get(c, c))}</th>'
                   for c in columns)
    body = []
    for row in rows:
        cells = []
        for column in columns:
            value, classes = row.get(column), ["t" if column in ("model", "reward") else "n"]
            if column == "delta_vs_base" and value:
                classes.append("up" if value > 0 else "down")
            if column == "mean" and several and value == best[row["reward"]]:
                classes.append("best")
            cells.append(f'<td class="{" ".join(classes)}">{esc(_format_cell(value, column))}</td>')
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f'<table class="scores"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def eval_html(models: Sequence[str], rows: list[dict[str, Any]], per_sample: list[dict],
              settings: dict[str, Any]) -> str:
    """A self-contained page: the score table of ``rows``, then one row per sample (the records of ``eval.json``:
    prompt, seed, ``scores`` and ``images`` per model) with each model's image and scores."""
    esc = html.escape
    names = list(per_sample[0]["scores"][models[0]]) if per_sample else []
    shown = _shown_scores(names)
    head = "".join(f"<th>{esc(label)}</th>" for label in models)
    body = []
    for sample in per_sample:
        cells = []
        for label in models:
            scores = sample["scores"][label]
            lines = []
            for name in shown:
                delta = ""
                if label != "base" and "base" in sample["scores"]:
                    diff = scores[name] - sample["scores"]["base"][name]
                    delta = f' <span class="{"up" if diff > 0 else "down" if diff < 0 else ""}">({diff:+.4f})</span>'
                lines.append(f"{esc(name)} {scores[name]:.4f}{delta}")
            src = esc(sample["images"][label], quote=True)
            cells.append(f'<td><a href="{src}"><img src="{src}" alt="{esc(label)}"></a>'
                         f'<div class="s">{"<br>".join(lines)}</div></td>')
        body.append(f'<tr><th class="p">{esc(sample["prompt"])}<div class="s">seed {sample["seed"]}</div></th>'
                    + "".join(cells) + "</tr>")
    css = ("*{box-sizing:border-box}body{font-family:system-ui,sans-serif;margin:24px;color:#222}"
           "@media (max-width:560px){body{margin:10px}}.wide{overflow-x:auto;max-width:100%;margin:12px 0}"
           "table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:4px 8px}"
           "table.scores{font-size:14px}table.scores thead th{background:#f4f4f4}"
           "table.scores .n{text-align:right;font-variant-numeric:tabular-nums}table.scores .t{text-align:left}"
           "table.scores .best{font-weight:700}"
           "table.g td,table.g th{padding:6px;vertical-align:top}table.g img{width:192px;max-width:40vw;"
           "display:block}th.p{text-align:left;width:200px;font-weight:600;word-break:break-word}"
           ".s{font-size:12px;color:#555;font-weight:normal}.up{color:#1a7f37}.down{color:#c62828}"
           "nav a{margin-right:12px}")
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>alignprop eval</title>'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<style>{css}</style></head><body><h1>alignprop eval</h1>"
            f"<p>{len(per_sample)} fixed samples (same prompt and noise for every model) from "
            f"<code>{esc(str(settings['pretrained_model']))}</code>, {settings['sample_num_steps']} "
            f"{esc(str(settings['scheduler'] or 'ddim'))} steps, "
            f"guidance {settings['sample_guidance_scale']}, eta {settings['sample_eta']}. "
            "Δ vs base: mean per-sample difference; wins vs base: share of samples scoring higher than the base "
            "model.</p>"
            '<nav><a href="grid.png">grid.png</a><a href="eval.csv">eval.csv</a><a href="eval.json">eval.json</a>'
            f'</nav><div class="wide">{score_table_html(rows)}</div>'
            f'<div class="wide"><table class="g"><tr><th>prompt</th>{head}</tr>{"".join(body)}</table></div>'
            "</body></html>\n")


# ---------------------------------------------------------------------- eval grid (PNG)


def image_grid(models: Sequence[str], per_sample: list[dict], images: dict[str, Sequence[Any]], cell: int = 256,
               scores: bool = True, font_size: int = 15) -> Any:
    """A PNG grid (a PIL image): one row per sample (the records of ``eval.json``), one column per model
    (``images[model][i]``, PIL images); model names on top, each prompt and its seed on the left and, with
    ``scores``, each image's scores under it (the difference to ``base`` in green or red). Columns widen to fit the
    score text, so small images keep their pixels and the numbers stay readable."""
    from PIL import Image, ImageDraw

    first = images[models[0]][0]
    scale = min(1.0, cell / max(first.size))
    w, h = max(1, round(first.size[0] * scale)), max(1, round(first.size[1] * scale))
    font, small = _font(font_size), _font(font_size - 2)
    line, small_line, pad = font_size + 5, font_size + 3, 4
    names = _shown_scores(list(per_sample[0]["scores"][models[0]]))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def score_lines(label: str, i: int) -> list[tuple[str, str, float]]:
        """(``name value``, ``(+delta)``, delta) for each shown score of image ``i`` of model ``label``."""
        values, base = per_sample[i]["scores"][label], per_sample[i]["scores"].get("base")
        lines = []
        for name in names:
            delta = values[name] - base[name] if base is not None and label != "base" else None
            lines.append((f"{name} {values[name]:.4f}", "" if delta is None else f" ({delta:+.4f})", delta or 0.0))
        return lines

    n, m = len(per_sample), len(models)
    texts = {(label, i): score_lines(label, i) for label in models for i in range(n)} if scores else {}
    widest = max([_text_width(measure, a + b, small) for lines in texts.values() for a, b, _ in lines], default=0)
    col_w = max(w, int(widest) + 2 * pad)
    score_h = len(names) * small_line + 2 * pad if scores else 0
    label_w, header_h, row_h = 220, line + 2 * pad, h + score_h
    grid = Image.new("RGB", (label_w + m * (col_w + pad) + pad, header_h + n * (row_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for j, label in enumerate(models):
        title = _fit_px(measure, label, font, col_w)
        x = label_w + j * (col_w + pad) + pad + (col_w - int(_text_width(measure, title, font))) // 2
        _draw_text(draw, (x, pad), title, font)
    for i in range(n):
        y = header_h + i * (row_h + pad) + pad
        room = max(1, row_h // line - 1)  # prompt lines that fit, less one for the seed
        lines = _wrap_px(measure, per_sample[i]["prompt"], font, label_w - 3 * pad)
        lines = lines[:room - 1] + [_fit_px(measure, " ".join(lines[room - 1:]), font, label_w - 3 * pad)] \
            if len(lines) > room else lines
        _draw_text(draw, (pad, y + 2), "\n".join(lines), font, spacing=line - font_size)
        _draw_text(draw, (pad, y + 2 + len(lines) * line), f"seed {per_sample[i]['seed']}", small, fill=(110,) * 3)
        for j, label in enumerate(models):
            x = label_w + j * (col_w + pad) + pad
            image = images[label][i]
            grid.paste(image.resize((w, h)) if image.size != (w, h) else image, (x + (col_w - w) // 2, y))
            for k, (text, delta, diff) in enumerate(texts.get((label, i), [])):
                ty = y + h + pad + k * small_line
                _draw_text(draw, (x + pad, ty), text, small)
                if delta:
                    color = (26, 127, 55) if diff > 0 else (198, 40, 40) if diff < 0 else (110, 110, 110)
                    _draw_text(draw, (x + pad + int(_text_width(measure, text, small)), ty), delta, small,
                               fill=color)
    return grid


def _font(size: int) -> Any:
    """A scalable font of ``size`` px: Pillow's own (>= 10.1), else DejaVu Sans, else the small bitmap default."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, AttributeError, OSError):  # older Pillow (no size argument) or no FreeType
        pass
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default()


def _latin1(text: str) -> str:
    return text.encode("latin-1", "replace").decode("latin-1")


def _text_width(draw: Any, text: str, font: Any) -> float:
    try:
        return draw.textlength(text, font=font)
    except UnicodeError:  # the bitmap fallback font is latin-1 only
        return draw.textlength(_latin1(text), font=font)


def _fit_px(draw: Any, text: str, font: Any, width: int) -> str:
    """``text`` cut (with "...") to at most ``width`` pixels."""
    if _text_width(draw, text, font) <= width:
        return text
    while text and _text_width(draw, text + "...", font) > width:
        text = text[:-1]
    return text + "..."


def _wrap_px(draw: Any, text: str, font: Any, width: int) -> list[str]:
    """Greedy word wrap to lines of at most ``width`` pixels (an overlong word is cut)."""
    lines, current = [], ""
    for word in text.split():
        trial = f"{current} {word}" if current else word
        if current and _text_width(draw, trial, font) > width:
            lines.append(current)
            current = word
        else:
            current = trial
    lines.append(current)
    return [_fit_px(draw, line, font, width) for line in lines]


def _draw_text(draw: Any, xy: tuple[int, int], text: str, font: Any, fill: Any = "black", spacing: int = 3) -> None:
    """Draw text; characters the font cannot render become '?'."""
    try:
        draw.multiline_text(xy, text, fill=fill, font=font, spacing=spacing)
    except UnicodeError:
        draw.multiline_text(xy, _latin1(text), fill=fill, font=font, spacing=spacing)
