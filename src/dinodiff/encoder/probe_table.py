"""The probe's results as table rows (for the report) and Markdown (table.md, the CLI's output).

Every row says on which images its numbers were measured: `held-out` (none seen in pretraining by that
encoder), `TRANSDUCTIVE (trained on K)` or `unknown (no training record)`.
"""

from __future__ import annotations

import logging

from dinodiff.encoder.probe_data import TRANSDUCTIVE, UNKNOWN

logger = logging.getLogger(__name__)

TABLE_NAME = "label AUCs and view retrieval, one row per encoder and label"
VIEW_NOTE = ("view top-1: retrieval of each image's other view among 2N views, both drawn from augmentations "
             "pretraining never applies (shear, zoom out, resolution loss, noise, JPEG): the invariance measure. "
             "pretext top-1: the same with the pretraining augmentation, the encoder's own training objective "
             "(not an invariance measure).")


def protocol_label(result: dict) -> str:
    """What an encoder's numbers are: held-out, TRANSDUCTIVE (trained on K probe images), or unknown."""
    protocol = result.get("protocol", UNKNOWN)
    if protocol == TRANSDUCTIVE:
        return f"TRANSDUCTIVE (trained on {result['probe_images_seen_in_pretraining']})"
    if protocol == UNKNOWN:
        return "unknown (no training record)"
    return protocol


def _views(result: dict) -> tuple[str, str]:
    return (f"{result['view_top1']:.3f} (of {result['view_count']})", f"{result['pretext_view_top1']:.3f}")


def table_rows(results: dict) -> list[dict]:
    """One row per encoder and label, for the report page."""
    rows = []
    for name, res in results["encoders"].items():
        view, pretext = _views(res)
        for label, r in res["labels"].items():
            rows.append({"encoder": name, "images": protocol_label(res),
                         "label": f"{label} ({r['positives']}/{r['negatives']})",
                         "k-NN AUC": f"{r['knn_auc']:.3f} ± {r['knn_auc_sd']:.3f}",
                         "linear AUC": f"{r['linear_auc']:.3f} ± {r['linear_auc_sd']:.3f}",
                         "view top-1 (held-out aug.)": view, "pretext top-1": pretext})
    return rows


def markdown_table(results: dict) -> str:
    """The probe-images statement, one table row per encoder and label, and what the view columns measure."""
    rows = [results["probe_images"]["statement"], "",
            "| encoder | images | label (pos/neg) | k-NN AUC | linear AUC | view top-1 (held-out aug.) | pretext top-1 |",
            "|---|---|---|---|---|---|---|"]
    for name, res in results["encoders"].items():
        view, pretext = _views(res)
        images = protocol_label(res)
        if not res["labels"]:
            rows.append(f"| {name} | {images} | - | - | - | {view} | {pretext} |")
        for label, r in res["labels"].items():
            rows.append(f"| {name} | {images} | {label} ({r['positives']}/{r['negatives']}) | {r['knn_auc']:.3f} ± "
                        f"{r['knn_auc_sd']:.3f} | {r['linear_auc']:.3f} ± {r['linear_auc_sd']:.3f} | {view} | "
                        f"{pretext} |")
    return "\n".join([*rows, "", VIEW_NOTE]) + "\n"
