"""Loss and probe landscapes around the student (Sarnthein et al. 2023, Fig. 5, 13-16): the runs, then
`randteach.analysis.landscape.compute_landscape` on the non-local and shared views."""
from __future__ import annotations

import math

import numpy as np

from ..config import config_from_dict, deep_merge, dotted_to_nested
from .base import Context, Experiment, analysis_device, completed, markdown_rows, missing_note


def anchor_values(result: dict) -> list[dict]:
    """Every metric of a landscape at the grid point nearest each anchor; "on_grid": whether that point is the
    anchor itself (the grid snaps onto anchors it passes within 1e-9 of, e.g. 0 and 1 on [-0.5, 1.5] with
    9 points, not with 3)."""
    out = []
    for (ax, ay), label in zip(result["anchors"], result["anchor_labels"]):
        j = int(np.argmin(np.abs(np.asarray(result["x"]) - ax)))
        i = int(np.argmin(np.abs(np.asarray(result["y"]) - ay)))
        on_grid = math.isclose(result["x"][j], ax, abs_tol=1e-9) and math.isclose(result["y"][i], ay, abs_tol=1e-9)
        out.append({"label": str(label), "x": float(ax), "y": float(ay), "on_grid": on_grid,
                    **{m: float(result[m][i, j]) for m in result["metrics"]}})
    return out


class Landscape(Experiment):
    name = "landscape"
    ids = "E9"
    paper = "Fig. 5, 13-16"
    claim = ("the student distilled from alpha ~ 0 settles in a local minimum next to an asymmetric valley around "
             "the teacher (the global optimum); an independent student (alpha = 1) reaches a different, worse "
             "minimum; the basin of the local solution coincides with higher probe accuracy.")

    def post(self, ctx: Context) -> list[str]:
        return [f"landscape {view} view, {plan['title']}, grid {plan['grid']}, extent {plan['extent']}"
                for view in ctx.params["views"] for plan in _plans(ctx.params, view)]

    def analyze(self, ctx: Context, arms) -> list[str]:
        from ..analysis.landscape import compute_landscape, view_anchors
        from ..runs.checkpoint import load_state_dict
        from ..train.supervised import run_info
        p = ctx.params
        lines = missing_note(arms, ["alpha0", "alpha1"])
        done0 = {c.train.seed: c for c in completed(arms["alpha0"])}
        for a1 in completed(arms["alpha1"]):
            a0 = done0.get(a1.train.seed)
            for view in p["views"]:
                if view == "shared" and a0 is None:
                    continue
                runs = [str(a1.run_dir())] if view == "non-local" else [str(a0.run_dir()), str(a1.run_dir())]
                anchors = view_anchors(view, runs)
                info = run_info(runs[0])
                if p.get("probe_overrides"):  # e.g. smaller probe subsets: one probe per grid point
                    info.cfg = config_from_dict(deep_merge(info.cfg.to_dict(),
                                                           dotted_to_nested(p["probe_overrides"])))
                for plan in _plans(p, view):
                    out = ctx.out / f"seed{a1.train.seed}" / f"{view}-{plan['name']}"
                    result = compute_landscape(anchors, info, out, teacher=load_state_dict(runs[0], "teacher"),
                                               grid=plan["grid"], extent=plan["extent"],
                                               projection=plan["projection"], unit=plan["unit"],
                                               n_loss=p["n_loss"], probe=plan["probe"], device=analysis_device(ctx),
                                               progress=ctx.progress)
                    lines += [f"## {view} view, {plan['title']} (seed {a1.train.seed})", ""]
                    lines += _section(result, out.relative_to(ctx.out), out)
        return lines


def _plans(p: dict, view: str) -> list[dict]:
    """The landscapes of one view: each projection over params.extent (default: the projection's own, the
    paper's [0, 1]^2 for the affine one), and for the shared view with
    params.zoom the zoom on the teacher (Fig. 14/16): orthogonal, its extent in units of |θ*_S(0) - θ_T|,
    without probes (the figures show the losses)."""
    from ..analysis.landscape import DEFAULT_EXTENTS
    plans = [{"name": proj, "title": f"{proj} projection", "projection": proj, "unit": "longer",
              "extent": list(p.get("extent") or DEFAULT_EXTENTS[proj]), "grid": p["grid"],
              "probe": p.get("probe", True)} for proj in p["projections"]]
    if view == "shared" and p.get("zoom"):
        z = p["zoom"]
        plans.append({"name": "zoom", "title": "zoom on the teacher (orthogonal, Fig. 14/16)",
                      "projection": "orthogonal", "unit": "first", "extent": z["extent"], "grid": z["grid"],
                      "probe": False})
    return plans


def _section(result: dict, rel, out) -> list[str]:
    """One landscape's report lines: its anchors' values, the loss range, its figures."""
    if not result["complete"]:
        return [f"_partial: {result['done']} of {result['total']} points; run again to finish._", ""]
    metrics = result["metrics"]
    rows = [[v["label"], f"({v['x']:.3g}, {v['y']:.3g})"]
            + [("–" if not v["on_grid"] else f"{100 * v[m]:.2f}" if m.startswith("probe_") else f"{v[m]:.4g}")
               for m in metrics]
            for v in anchor_values(result)]
    # the loss is the KL to the teacher for ce and kl runs (analysis.landscape): 0 at θ_T
    lines = markdown_rows(["anchor", "coordinates"] + [m + (" (%)" if m.startswith("probe_") else "")
                                                       for m in metrics], rows)
    if "loss" in result:
        loss = np.asarray(result["loss"], float)
        lines += [f"Loss over the grid: min {np.nanmin(loss):.4g}, max {np.nanmax(loss):.4g}.", ""]
    return lines + [f"![{m}]({rel}/{m}.png)" for m in ("loss", "probe_linear", "embed_kl")
                    if (out / f"{m}.png").exists()] + [""]


EXPERIMENT = Landscape()
