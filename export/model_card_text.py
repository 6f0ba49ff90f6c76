"""model_card.md from the card's data (`export.model_card.card_data`): formatting only, no figure of its own."""

from __future__ import annotations

from typing import Any


def _f(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _interval(m: dict[str, float]) -> str:
    return f"{m['value']:.3f} [{m['low']:.3f}, {m['high']:.3f}]"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(_f(c) for c in row) + " |" for row in rows), ""]


def _model(card: dict[str, Any]) -> list[str]:
    m = card.get("model")
    if not m:
        return ["## Model details", "", "Not recorded (model.json absent).", ""]
    net = m.get("network") or {}
    size = m.get("image_size")
    return ["## Model details", "",
            f"- Network: **{net.get('name')}** (pool {net.get('pool')}, head hidden {net.get('hidden')}, dropout "
            f"{net.get('dropout')}), {m.get('num_parameters'):,} parameters",
            f"- Input: {size} px, {m.get('in_chans')} channel(s); loss: {m.get('loss')}; classes: {', '.join(m.get('classes') or [])}"
            + (f"; positive class: {m['positive_class']}" if m.get("positive_class") else ""), ""]


def _data(card: dict[str, Any]) -> list[str]:
    d = card.get("data")
    if not d:
        return ["## Data", "", "Not recorded (no run directory).", ""]
    s = d["split"]
    lines = ["## Data", "", f"- Source: `{d.get('source')}`; classes: {', '.join(d.get('classes') or [])}",
             f"- Split: ratios {s.get('ratios')}, seed {s.get('seed')}, grouped by patient: {s.get('group_by_patient')} "
             f"(group keys {s.get('group_by')}), split file {s.get('file')} (assignment hash {s.get('assignment_hash')})", ""]
    if d.get("counts"):
        splits = list(next(iter(d["counts"].values())))
        lines += _table(["class", *splits], [[c, *v.values()] for c, v in d["counts"].items()])
    a = d.get("audit")
    if a:
        lines += [f"Data audit: {a.get('images')} images; exact-duplicate clusters {a.get('exact_clusters')} "
                  f"({a.get('exact_images')} images), near-duplicate clusters {a.get('near_clusters')} ({a.get('near_images')} "
                  f"images); label conflicts {a.get('label_conflict')}, split leakage {a.get('leakage')}, cross-patient "
                  f"{a.get('cross_patient')}, redundant {a.get('redundant')}; policy on_conflict: **{a.get('on_conflict')}** "
                  f"(dropped: {len(a.get('dropped') or [])}).", ""]
    else:
        lines += ["Data audit: not recorded (audit.json absent).", ""]
    return lines


def _stage(name: str, stage: dict[str, Any]) -> list[str]:
    board = stage.get("leaderboard")
    if not board:
        return [f"- {name} ({stage['what']}): leaderboard absent"]
    line = (f"- {name} ({stage['what']}): {len(board['grid_points'])} grid points ({', '.join(board['grid_points'])}); "
            f"winner **{board['winner']}**; indistinguishable from it on validation: {', '.join(board['indistinguishable'])}")
    if board.get("parsimonious"):
        line += f"; parsimonious choice: **{board['parsimonious']}** ({board['parsimonious_params']:,} parameters)"
    return [line]


def _selection(card: dict[str, Any]) -> list[str]:
    s = card.get("selection")
    if not s:
        return ["## How it was selected", "", "A single run (not selected by a sweep).", ""]
    rule = s["rule"]
    text = (f"{rule.get('metric')} ({rule.get('direction')})" if rule.get("rule") == "metric" else
            "rank score: " + ", ".join(f"{t['weight']:g} x {t['metric']}" for t in rule.get("terms") or []))
    cv = s.get("cv") or {}
    w, b = s["winner"], s["budget"]
    lines = ["## How it was selected", "", f"Sweep **{s['sweep']}**, two stages, rule **{rule.get('rule')}** ({text}); "
             f"ties go to fewer parameters. Repeats per grid point: {s.get('repeats')}; cross-validation folds: "
             f"{cv.get('folds') or 'none (fixed validation split)'}; seed {s.get('seed')}.", ""]
    lines += _stage("Stage 1", s["stages"]["stage1"]) + _stage("Stage 2", s["stages"]["stage2"])
    lines += ["", f"Winner: **{w['base_architecture']}** + {w['optimizer']} + {w['loss']} ({w['params']:,} parameters, "
              f"trial {w['trial']}, run `{w['run_dir']}`). Budget: pruner {b['pruner']}, early stopping patience "
              f"{b['early_stopping_patience']}, stage-1 epochs {b['max_epochs']}.", ""]
    return lines


def _test(card: dict[str, Any]) -> list[str]:
    t = card.get("test")
    if not t:
        return ["## Test metrics", "", "Not measured (evaluation.json absent): run `python cli.py test` on the run.", ""]
    lines = ["## Test metrics", "", f"{t['n_images']} test images, {int(t['level'] * 100)}% bootstrap intervals "
             f"({t.get('bootstrap')} resamples; {t.get('resampling')}).", ""]
    lines += _table(["metric", "value [95% interval]"], [[k, _interval(v)] for k, v in t["metrics"].items()])
    per_class = t.get("per_class") or {}
    if per_class:
        classes = list(next(iter(per_class.values())))
        lines += ["Per class:", ""]
        lines += _table(["metric", *classes], [[m, *(_interval(v[c]) for c in classes)] for m, v in per_class.items()])
    return lines


def _calibration(card: dict[str, Any]) -> list[str]:
    c = card.get("calibration")
    if not c:
        return ["## Calibration", "", "Not measured.", ""]
    after = (f"; after temperature scaling (T = {c['temperature']:.3f}, fitted on validation): {c['ece_after_temperature']:.4f}"
             if c.get("ece_after_temperature") is not None else "")
    return ["## Calibration", "", f"Expected calibration error on test ({c.get('bins')} bins): {c['ece_before']:.4f}{after}.", ""]


def render(card: dict[str, Any]) -> str:
    """The card as Markdown, in Mitchell et al.'s order."""
    sw = card["software"]
    title = (card.get("model") or {}).get("network", {}).get("name", "model")
    lines = [f"# Model card: {title}", "", f"> **{card['intended_use']['warning']}**", ""]
    lines += _model(card)
    lines += ["## Intended use", "", f"- Primary use: {card['intended_use']['primary_use']}",
              f"- Out of scope: {card['intended_use']['out_of_scope']}", ""]
    lines += _data(card) + _selection(card) + _test(card) + _calibration(card)
    lines += ["## Known limitations", "", *(f"- {item}" for item in card["limitations"]), ""]
    lines += ["## Software and reproduction", "",
              "Versions (environment that wrote this card): " + ", ".join(f"{k} {v}" for k, v in sw["versions_when_card_written"].items()),
              "", f"Reproduce: `{sw['reproduce']}`" if sw.get("reproduce") else "Reproduce: no config file found.", ""]
    return "\n".join(lines)
