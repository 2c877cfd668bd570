"""Budget advisor: before any training, the selection budget past which returns flatten.

Two curves of one greedy selection over the pool (steps/selection/selectors.py), both free of
labels and training:
- the information curve f(S_k) = log det(λI + V_{S_k}) and its per-pick gains, and
- the held-out leverage lev(k) = mean over the loss tokens t of a seeded held-out sample of
  pool examples (never candidates) of x_t (λI + V_{S_k})⁻¹ x_t = tr((λI + V_{S_k})⁻¹ G) / T,
  G = Σ FᵀF of the held-out examples: the variance term of the error bound of
  docs/concepts/fishersft.md, measured on states the selection did not see.

The rule (one, with fixed references so the knee does not move with how far the curve is
walked): the suggested budget is the smallest k such that
  (1) every pick after the k-th gains at most `gain_fraction` (5%) of the mean gain of the
      first `first_picks` (10) picks, and
  (2) the held-out leverage has made (1 - `leverage_fraction`) (95%) of its fall from one
      pick to the whole candidate pool: lev(k) - lev_all <= 5% (lev(1) - lev_all).
lev_all is computed from all candidates at once, so (2) reads the same whatever max_budget.
A knee detector (Kneedle, Satopää et al. 2011) was not chosen: on curves that fall like 1/k
past coverage its knee moves with the range it is shown. Both references include the first
picks, whose gains the ridge λ inflates (unspanned directions count log(1/λ)), so the rule
marks where the selection leaves the coverage phase for the 1/n tail; whether eval loss
flattens there is issue 15's open check against measured curves.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
from numpy.typing import NDArray
from tqdm import tqdm

from steps.data.ingest import IngestConfig
from steps.modeling import ModelConfig
from steps.selection.embedding.embed import EmbedConfig, load_pool
from steps.selection.greedy.design import Array
from steps.selection.greedy.settings import GreedySettings
from steps.selection.pool import FeaturePool
from steps.selection.select import SelectConfig, check_embed_for, embed_file, resolve_backend
from steps.selection.selectors import DEFAULT_RIDGE, Selection, design_of, select

# Selectors whose budget always counts loss tokens: refused, the curves step one example.
TOKEN_SELECTORS = ("fisher-per-token",)


@dataclass(frozen=True)
class AdviseSettings:
    """The rule's fractions and the curve's resolution (the module docstring says why)."""

    holdout_fraction: float = 0.1  # of the pool, held out for the leverage (at least 1)
    first_picks: int = 10  # whose mean gain is the reference of rule (1)
    gain_fraction: float = 0.05  # rule (1): a pick past the knee gains at most this share
    leverage_fraction: float = 0.05  # rule (2): at most this share of the fall left
    points: int = 30  # log-spaced k at which the leverage curve is computed

    def __post_init__(self) -> None:
        for name in ("holdout_fraction", "gain_fraction", "leverage_fraction"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        for name in ("first_picks", "points"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True, eq=False)
class Advice:
    """The suggested budget, the rule's numbers behind it and the curves they came from."""

    selector: str
    examples: int  # the suggested budget
    loss_tokens: int  # of the suggested budget's picks
    flattened: bool  # False: returns had not flattened by max_budget, which is suggested
    reason: str
    candidates: int  # pool examples the selection could pick (the pool less the held-out)
    held_out: int
    gain_reference: float  # mean gain of the first picks (nats)
    gain_threshold: float
    gain_after_knee: float  # the largest gain of a pick past the knee (0 when none)
    leverage_first: float  # lev(1)
    leverage_all: float  # lev with every candidate
    leverage_threshold: float
    leverage_at_knee: float
    objective: Array = field(repr=False)  # (K,) f(S_k), k = 1..K
    gains: Array = field(repr=False)  # (K,)
    tokens: NDArray[np.int64] = field(repr=False)  # (K,) loss tokens of the first k picks
    leverage_k: NDArray[np.int64] = field(repr=False)  # the k of each leverage point
    leverage: Array = field(repr=False)


def split_holdout(n: int, fraction: float, seed: int) -> tuple[NDArray[np.int64], ...]:
    """(candidates, held_out) pool rows, each ascending: a seeded `fraction` of n (at least
    one) held out; ValueError when that leaves no candidate."""
    held = max(1, round(fraction * n))
    if held >= n:
        raise ValueError(
            f"a pool of {n} example(s) cannot hold out {held} for the leverage curve and "
            "keep a candidate: the advisor needs at least 2 examples"
        )
    rows = np.random.default_rng(seed).permutation(n)
    return np.sort(rows[held:]), np.sort(rows[:held])


def leverage(design: Array, ridge: float, held_gram: Array, held_tokens: int) -> float:
    """mean_t x_t (λI + design)⁻¹ x_t = tr((λI + design)⁻¹ G) / T, by a Cholesky of the
    regularised design (G = Σ FᵀF of the held-out tokens, T their count)."""
    factor = np.linalg.cholesky(ridge * np.eye(len(design)) + design)
    solved = np.linalg.solve(factor, held_gram)  # L⁻¹G; tr(V⁻¹G) = tr(L⁻ᵀL⁻¹G)
    return float(np.trace(np.linalg.solve(factor.T, solved))) / held_tokens


def gain_knee(gains: Array, threshold: float) -> int:
    """The smallest k (>= 1) such that every pick after the k-th gains at most `threshold`."""
    above = np.flatnonzero(gains > threshold)
    return max(1, int(above[-1]) + 1) if len(above) else 1


def log_grid(budget: int, points: int) -> NDArray[np.int64]:
    """About `points` log-spaced k in 1..budget, both ends included."""
    return np.unique(np.round(np.geomspace(1, budget, points)).astype(np.int64))


def advise(
    pool: FeaturePool,
    selector: str = "fisher",
    *,
    max_budget: int | None = None,
    ridge: float = DEFAULT_RIDGE,
    seed: int = 0,
    settings: AdviseSettings | None = None,
    greedy: GreedySettings | None = None,
    backend: str = "numpy",
    device: str = "cpu",
    progress: bool = False,
    setting: str = "max_budget",
) -> Advice:
    """Select up to max_budget (None: every candidate) of the pool less a seeded hold-out,
    and read the suggested budget off the two curves (the module docstring's rule).

    setting: what named max_budget, for errors (the CLI's --max-budget).
    """
    settings = settings or AdviseSettings()
    if selector in TOKEN_SELECTORS:
        raise ValueError(
            f"select.selector={selector} counts its budget in loss tokens; the advisor walks "
            "the curve one example at a time: use fisher (or another example selector)"
        )
    rows, held = split_holdout(pool.N, settings.holdout_fraction, seed)
    budget = len(rows) if max_budget is None else max_budget
    if not 1 <= budget <= len(rows):
        raise ValueError(
            f"{setting}={budget}: need 1..{len(rows)}, the {pool.N}-example pool less the "
            f"{len(held)} held out for the leverage curve"
        )
    candidates = pool.subset(rows)
    chosen = select(
        candidates,
        budget,
        selector,
        ridge=ridge,
        seed=seed,
        progress=progress,
        settings=greedy,
        backend=backend,
        device=device,
    )
    held_gram = design_of(pool, held)
    held_tokens = int(pool.n_tokens[held].sum())

    def leverage_of(picks: NDArray[np.int64]) -> float:
        return leverage(design_of(candidates, picks), ridge, held_gram, held_tokens)

    levels = _leverage_curve(
        candidates, chosen.order, ridge, held_gram, held_tokens, settings, progress
    )
    return _read_knee(
        candidates, chosen, levels, leverage_of, len(held), settings, selector, setting
    )


def _leverage_curve(
    pool: FeaturePool,
    order: NDArray[np.int64],
    ridge: float,
    held_gram: Array,
    held_tokens: int,
    settings: AdviseSettings,
    progress: bool,
) -> tuple[NDArray[np.int64], Array]:
    """lev(k) at the log grid, walking the picks once: adding FᵀF per pick."""
    ks = log_grid(len(order), settings.points)
    design = np.zeros((pool.d, pool.d))
    values, done = [], 0
    for k in tqdm(ks, disable=not progress, desc="held-out leverage"):
        design += design_of(pool, order[done:k])
        values.append(leverage(design, ridge, held_gram, held_tokens))
        done = int(k)
    return ks, np.array(values)


def _read_knee(
    pool: FeaturePool,
    chosen: Selection,
    levels: tuple[NDArray[np.int64], Array],
    leverage_of: Callable[[NDArray[np.int64]], float],
    held_out: int,
    settings: AdviseSettings,
    selector: str,
    setting: str,
) -> Advice:
    """Apply rules (1) and (2); the knee is the first k meeting both, or the max budget."""
    (ks, values), order, gains = levels, chosen.order, chosen.gains
    leverage_all = leverage_of(np.arange(pool.N))
    reference = float(gains[: settings.first_picks].mean())
    gain_threshold = settings.gain_fraction * reference
    leverage_threshold = float(
        leverage_all + settings.leverage_fraction * (values[0] - leverage_all)
    )
    # lev is non-increasing in k (each pick adds a PSD term): the first grid k under the
    # threshold bounds rule (2)'s k from above, which is what the grid resolves.
    passing = np.flatnonzero(values <= leverage_threshold * (1 + 1e-9))
    leverage_k = int(ks[passing[0]]) if len(passing) else len(order) + 1
    knee = max(gain_knee(gains, gain_threshold), leverage_k)
    flattened = knee < len(order)
    knee = min(knee, len(order))
    tokens = np.cumsum(pool.n_tokens[order])
    after = float(gains[knee:].max()) if flattened else 0.0
    at_knee = leverage_of(order[:knee])
    if flattened:
        reason = (
            f"past {knee} examples each further pick adds at most {after:.3g} nats "
            f"(<= {settings.gain_fraction:.0%} of the first {settings.first_picks} picks' "
            f"mean gain, {reference:.3g}), and the held-out leverage ({at_knee:.3g}) has made "
            f"{1 - settings.leverage_fraction:.0%} of its fall to the whole pool's "
            f"({leverage_all:.3g})"
        )
    else:
        reason = (
            f"returns had not flattened within {len(order)} examples (a pick gained more "
            f"than {settings.gain_fraction:.0%} of the first picks' mean, or the held-out "
            f"leverage had not made {1 - settings.leverage_fraction:.0%} of its fall): the "
            f"pool still adds information; {setting} up to {pool.N} walks further"
        )
    return Advice(
        selector=selector,
        examples=knee,
        loss_tokens=int(tokens[knee - 1]),
        flattened=flattened,
        reason=reason,
        candidates=pool.N,
        held_out=held_out,
        gain_reference=reference,
        gain_threshold=gain_threshold,
        gain_after_knee=after,
        leverage_first=float(values[0]),
        leverage_all=leverage_all,
        leverage_threshold=leverage_threshold,
        leverage_at_knee=at_knee,
        objective=chosen.objective,
        gains=gains,
        tokens=tokens,
        leverage_k=ks,
        leverage=values,
    )


def advice_json(advice: Advice) -> dict[str, object]:
    """advice.json's content: the suggestion and the rule's numbers, then the curves."""
    record = asdict(advice)
    for name in ("objective", "gains", "tokens", "leverage_k", "leverage"):
        record[name] = np.asarray(record[name]).tolist()
    return record


def write_advice(advice: Advice, out_dir: Path) -> tuple[Path, Path]:
    """out_dir/advice.json and advice.png (information and held-out leverage vs k)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, plot_path = out_dir / "advice.json", out_dir / "advice.png"
    json_path.write_text(json.dumps(advice_json(advice), indent=1) + "\n")
    _plot_advice(advice, plot_path)
    return json_path, plot_path


def _plot_advice(advice: Advice, path: Path) -> None:
    figure = Figure(figsize=(10, 3.8))
    gain_axis, leverage_axis = figure.subplots(1, 2)
    ks = np.arange(1, len(advice.gains) + 1)
    gain_axis.plot(ks, np.cumsum(advice.gains))
    gain_axis.set_ylabel("information gain f(S_k) − f(∅) (nats)")
    gain_axis.set_title(f"Information curve ({advice.selector})")
    leverage_axis.plot(advice.leverage_k, advice.leverage, marker=".")
    leverage_axis.axhline(advice.leverage_threshold, color="grey", ls=":", label="rule (2)")
    leverage_axis.set_yscale("log")
    leverage_axis.set_ylabel("held-out leverage (mean xᵀV⁻¹x)")
    leverage_axis.set_title(f"Held-out leverage ({advice.held_out} examples)")
    for axis in (gain_axis, leverage_axis):
        axis.axvline(advice.examples, color="red", ls="--", label=f"knee: k={advice.examples}")
        axis.set_xscale("log")
        axis.set_xlabel("examples selected (k)")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def advise_file(
    data: IngestConfig,
    model: ModelConfig,
    embed: EmbedConfig,
    config: SelectConfig,
    work_dir: Path,
    *,
    device: str,
    precision: str,
    project_dir: Path,
    max_budget: int | None = None,
    setting: str = "max_budget",
) -> Advice:
    """data.source → ingest's field mapping → embed with `model` → advise with
    config.selector, ridge, seed and backend (its budget is what the advisor suggests).

    The same sections as `sift select` (steps/selection/select.py select_from_file), so a
    file maps and embeds as it would there; work_dir receives the table and statistics.
    """
    check_embed_for(config, embed)
    _, features = embed_file(
        data, model, embed, work_dir, device=device, precision=precision, project_dir=project_dir
    )
    return advise(
        load_pool(features),
        config.selector,
        max_budget=max_budget,
        ridge=config.ridge,
        seed=config.seed,
        greedy=GreedySettings(device_memory_mb=config.device_memory_mb),
        backend=resolve_backend(config.backend, device),
        device=device,
        progress=True,
        setting=setting,
    )
