"""The segment stage's settings (what the grid search and its outputs depend on) and one grid cell. A light module:
the CLI makes `dinodiff segment`'s options from SegmentSettings' fields at start-up, without torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dinodiff.config import setting

# diffseg: DiffSeg (the paper's); diffcut: DiffCut's recursive Ncut on the encoder's self-attention outputs;
# ncut-inputs: the same cut on the *inputs* of a self-attention layer (the normalised hidden states it attends
# over), any layer of the UNet: where attention is near-uniform, its outputs are nearly the same everywhere;
# ncut-superpixels: the same cut on the same features, with the image's superpixels as its nodes instead of the
# feature map's positions, so that segment edges follow the image's own edges.
METHODS = ("diffseg", "diffcut", "ncut-inputs", "ncut-superpixels")
CUT_METHODS = ("diffcut", "ncut-inputs", "ncut-superpixels")  # grid: taus x feature_sides x alphas (x node scales)
# the features each cut reads: the self-attention layers' outputs (DiffCut's) or inputs
CUT_FEATURES = {"diffcut": "outputs", "ncut-inputs": "inputs", "ncut-superpixels": "inputs"}
CUT_NAMES = {"diffcut": "DiffCut", "ncut-inputs": "Ncut on attention inputs",
             "ncut-superpixels": "Ncut over superpixels"}
CONDITIONS = ("image", "null")  # the UNet's condition: the image's own c_GLB, or the null condition
# DiffSeg's merging threshold: a KL value, or a quantile of each image's anchor-to-anchor KL
THRESHOLD_MODES = ("absolute", "relative")
# Refinements of a method's label map: none (the method as published) or components (each segment split into its
# 4-connected components, as the Otsu baseline's dark pixels are); a refined method is its own column.
REFINEMENTS = {"none": "", "components": "+cc"}


@dataclass(frozen=True)
class Cell:
    """One grid-search configuration: a model, the timesteps whose passes are averaged, a method and its
    parameters (DiffSeg: anchor grid, threshold; DiffCut: feature map side, tau, alpha)."""

    model: str  # model label (see stage.model_label)
    method: str
    timesteps: tuple[int, ...]
    # DiffSeg: MxM anchors. The cuts: side of the feature map (0 = the last layer: DiffCut's, the encoder's final
    # self-attention; ncut-inputs', the UNet's final self-attention)
    grid: int
    threshold: float  # DiffSeg: merging threshold. The cuts: Ncut threshold tau
    alpha: float = 0.0  # the cuts: affinity exponent (0 for DiffSeg)
    refine: str = "none"  # see REFINEMENTS
    scale: float = 0.0  # ncut-superpixels: Felzenszwalb scale of the superpixels the cut joins (0 for the others)

    @property
    def variant(self) -> str:
        """The method's column: 'diffseg', 'diffcut', or with a refinement 'diffseg+cc', ..."""
        return self.method + REFINEMENTS[self.refine]

    @property
    def timestep_label(self) -> str:
        return "+".join(str(t) for t in self.timesteps)

    def describe(self, mode: str, iterations: int, noise: str = "") -> str:
        t = f"t={self.timestep_label}{noise}"
        refine = "" if self.refine == "none" else f" +{self.refine}"
        if self.method in CUT_METHODS:
            side = "final" if self.grid == 0 else f"{self.grid}x{self.grid}"
            nodes = f" superpixels={self.scale:g}" if self.method == "ncut-superpixels" else ""
            return (f"{self.model} {CUT_NAMES[self.method]} {t} features={side}{nodes} tau={self.threshold:g} "
                    f"alpha={self.alpha:g}{refine}")
        return f"{self.model} DiffSeg {t} grid={self.grid}x{self.grid} {mode} {self.threshold:g}x{iterations}{refine}"


@dataclass(frozen=True)
class SegmentSettings:
    """Zero-shot segmentation grid search and how it runs.

    ``methods``: 'diffseg' (faithful DiffSeg; grid: thresholds x grid_sizes), 'diffcut' (recursive normalised
    cut on the encoder's self-attention outputs; grid: taus x feature_sides x alphas), 'ncut-inputs' (the
    same cut on a self-attention layer's inputs; the same grid) and/or 'ncut-superpixels' (that cut with the image's
    Felzenszwalb superpixels as nodes; the same grid x node_scales). All share ``timesteps``: each entry is a tuple of
    timesteps whose passes are averaged (DiffSeg: the aggregated attention; the cuts: the features, concatenated
    after L2 normalisation), and every noise draw of
    ``noise_seeds`` adds one pass per timestep (empty: the clean latent, as DiffSeg).

    Tuning: each image is put in the tuning or the report split by a hash of its subject (the image itself
    when the dataset has no subject ids); the configuration is chosen on the tuning split and every number
    in the tables is measured on the report split. An image the model trained on (and every image of its
    subject) goes to the tuning split unless ``transductive``. Defaults are the paper's DiNO-Diffusion DiffSeg setting
    (absolute 0.05, t=300, 16x16); ``threshold_mode='relative'`` reads each DiffSeg threshold as a quantile of
    the image's anchor-to-anchor KL instead.
    """

    methods: tuple[str, ...] = setting(("diffseg",), "Zero-shot method(s), comma list: diffseg (the paper's: merge "
                                       "self-attention maps by KL), diffcut (recursive normalised cut on the "
                                       "encoder's self-attention outputs), ncut-inputs (the same cut on the "
                                       "inputs of a self-attention layer, any in the UNet) and/or ncut-superpixels "
                                       "(that cut joining the image's superpixels: segment edges follow the "
                                       "image's edges).", flags=("--method",))
    thresholds: tuple[float, ...] = setting((0.05,), "DiffSeg: comma list of merging thresholds to grid-search (each "
                                                     "used for every iteration).")
    threshold_mode: str = setting("absolute", "DiffSeg: absolute (the paper's KL values) or relative (quantiles of "
                                              "each image's anchor-to-anchor KL).")
    merge_iterations: int = setting(3, "DiffSeg: merging iterations (DiffSeg's threshold list length).")
    # timestep groups; each entry a timestep (a group of one), a list of timesteps or "100+300" (YAML:
    # timesteps: [300, [100, 300]]); always held as tuples of ints, ((300,), (100, 300))
    timesteps: tuple[Any, ...] = setting(((300,),), "Comma list of timestep groups to grid-search; a group averages "
                                                    "its passes, e.g. 300,100+300+500 (in a --config file: "
                                                    "timesteps: [[300], [100, 300]]).")
    grid_sizes: tuple[int, ...] = setting((16,), "DiffSeg: comma list of anchor grid sizes M (MxM anchors; at most the "
                                                 "largest attention map's side).")
    taus: tuple[float, ...] = setting((0.5,), "The cuts (diffcut, ncut-*): comma list of Ncut thresholds tau (a "
                                              "segment is split while its best cut is below tau; DiffCut's default "
                                              "0.5).")
    alphas: tuple[float, ...] = setting((10.0,), "The cuts (diffcut, ncut-*): comma list of affinity exponents alpha "
                                                 "(cosine similarity, min-max scaled, ** alpha; DiffCut's default 10).")
    feature_sides: tuple[int, ...] = setting((0,), "The cuts (diffcut, ncut-*): comma list of feature maps: 0 = the "
                                                   "last layer (DiffCut: the encoder's final self-attention; ncut-*: "
                                                   "the UNet's), S = the last such layer with an SxS map.")
    refinements: tuple[str, ...] = setting(("none",), "Comma list: none (the methods as published) and/or components "
                                                      "(also each method with every segment split into its connected "
                                                      "components, its own column).", flags=("--refine",))
    superpixel_scales: tuple[float, ...] = setting((50.0, 100.0, 200.0, 400.0, 800.0, 1600.0),
                                                   "Image-only control (Felzenszwalb superpixels of the grey levels, "
                                                   "each one a segment): comma list of scales, the best chosen on the "
                                                   "tuning split like the zero-shot methods' configurations.")
    node_scales: tuple[float, ...] = setting((50.0, 100.0), "ncut-superpixels: comma list of Felzenszwalb scales of "
                                                            "the superpixels the cut runs on (smaller: more, smaller "
                                                            "nodes).")
    condition: str = setting("image", "UNet condition: image (the image's own c_GLB) or null.")
    noise_seeds: tuple[int, ...] = setting((), "Comma list of noise seeds: one noised pass per seed and timestep, "
                                               "averaged (default: the clean latent, as DiffSeg).")
    report_fraction: float = setting(0.5, "Share of subjects (images without subject ids: images) in the report "
                                          "split; the rest choose the configuration.")
    split_seed: int = setting(0, "Seed of the tuning / report split.")
    transductive: bool = setting(False, "Let images the model trained on (UNet or encoder; found by content) into the "
                                        "report split. By default they only tune: every reported Dice is on images "
                                        "the model never saw.")
    resolution: int | None = setting(None, "Image size in pixels (default: the (first) model's training resolution).")
    sd15: str | None = setting(None, "A Stable Diffusion 1.x folder (unet/, vae/, text_encoder/, tokenizer/) to run "
                                     "through the same code as a DiffSeg baseline.")
    batch_size: int = setting(8, "Images per UNet pass.")
    device: str = setting("auto", "auto (CUDA when available), cpu, cuda, ...")
    limit: int | None = setting(None, "Use only N images of each dataset: the first of its report split "
                                      "(--report-fraction of N) and of its tuning split, split first.")
    n_overlay: int = setting(3, "Best and worst report-split cases per dataset and method drawn in OUT/overlays/ "
                                "(0 = none).", flags=("--overlays",))

    def __post_init__(self) -> None:
        # one form whatever the source (Python lists, OmegaConf's inner lists, a bare int as a group of one)
        for name in ("methods", "thresholds", "grid_sizes", "taus", "alphas", "feature_sides", "refinements",
                     "noise_seeds", "superpixel_scales", "node_scales"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "timesteps", tuple(self.timestep_groups()))
        self.check()  # a bad value fails where the settings are made (a --config file: exit 2 naming it)

    def check(self) -> None:
        if self.threshold_mode not in THRESHOLD_MODES:
            raise ValueError(f"--threshold-mode must be one of {THRESHOLD_MODES}, got {self.threshold_mode!r}.")
        if self.condition not in CONDITIONS:
            raise ValueError(f"--condition must be one of {CONDITIONS}, got {self.condition!r}.")
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown or not self.methods:
            raise ValueError(f"--method must be one or more of {METHODS}, got {list(self.methods)}.")
        if self.merge_iterations < 1 or not self.thresholds or not self.timesteps or not self.grid_sizes:
            raise ValueError("need >= 1 merge iteration, threshold, timestep and grid size.")
        if any(not group for group in self.timestep_groups()):
            raise ValueError("every --timesteps entry needs at least one timestep (e.g. 300 or 100+300).")
        if not self.taus or not self.alphas or not self.feature_sides:
            raise ValueError("the cuts (diffcut, ncut-inputs, ncut-superpixels) need at least one tau, alpha and "
                             "feature side.")
        if not self.superpixel_scales or min(self.superpixel_scales) <= 0:
            raise ValueError(f"--superpixel-scales must be one or more positive scales, got "
                             f"{list(self.superpixel_scales)}.")
        if not self.node_scales or min(self.node_scales) <= 0:
            raise ValueError(f"--node-scales must be one or more positive scales, got {list(self.node_scales)}.")
        if not self.refinements or set(self.refinements) - set(REFINEMENTS):
            raise ValueError(f"--refine must be one or more of {tuple(REFINEMENTS)}, got {list(self.refinements)}.")
        if not 0.0 < self.report_fraction < 1.0:
            raise ValueError(f"--report-fraction must be in (0, 1), got {self.report_fraction}: the configuration "
                             "is chosen on the other images.")

    def timestep_groups(self) -> list[tuple[int, ...]]:
        """``timesteps`` as groups: 300 -> (300,), "100+300" -> (100, 300), (100, 300) stays."""
        groups = []
        for g in self.timesteps:
            if isinstance(g, str):
                g = [t for t in g.split("+") if t.strip()]
            elif not isinstance(g, (list, tuple)):
                g = [g]
            if any(isinstance(t, bool) or float(t) != int(float(t)) for t in g):
                raise ValueError(f"timesteps: {g!r} is not a timestep group (an int, a list of ints or '100+300').")
            groups.append(tuple(int(float(t)) for t in g))
        return groups

    def cell_settings(self) -> dict[str, Any]:
        """What every cell's labels depend on besides the cell itself: part of a cached cell's key, and
        results.json's "settings"."""
        return {"threshold_mode": self.threshold_mode, "merge_iterations": self.merge_iterations,
                "condition": self.condition, "noise_seeds": list(self.noise_seeds), "resolution": self.resolution}

    def noise_label(self) -> str:
        return "" if not self.noise_seeds else f" noise x{len(self.noise_seeds)}"

    def describe(self, cell: Cell) -> str:
        return cell.describe(self.threshold_mode, self.merge_iterations, self.noise_label())

    def variants(self) -> list[str]:
        """The zero-shot columns: each method, and each refined method."""
        return [m + REFINEMENTS[r] for m in self.methods for r in self.refinements]

    def method_cells(self, model: str, timesteps: tuple[int, ...]) -> list[Cell]:
        """Every cell of the grid for one model and timestep group."""
        cells = []
        for r in self.refinements:
            if "diffseg" in self.methods:
                cells += [Cell(model, "diffseg", timesteps, int(g), float(t), refine=r)
                          for g in self.grid_sizes for t in self.thresholds]
            for m in [m for m in CUT_METHODS if m in self.methods]:
                scales = self.node_scales if m == "ncut-superpixels" else (0.0,)
                cells += [Cell(model, m, timesteps, int(s), float(t), float(a), r, float(n)) for s in self.feature_sides
                          for t in self.taus for a in self.alphas for n in scales]
        return cells
