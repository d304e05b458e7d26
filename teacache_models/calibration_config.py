"""Writing a calibration into a zoo config: a fit's coefficients into the presets (or `teacache.fits`) that use
its indicator, per-expert fits, a threshold table, and a new preset whose threshold comes from that table.

The YAML text is edited in place, so comments and every other key stay as they are, and a file is written
only after the zoo loader accepts the result.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .cache.forecast import FORECAST
from .calibration import BranchFits, PolynomialFit, as_branch_fits
from .params import TeaCacheParams

__all__ = [
    "CALIBRATED_PRESET",
    "MIN_PSNR_DB",
    "add_preset",
    "calibration_source",
    "presets_using",
    "threshold_for_psnr",
    "threshold_rule_note",
    "write_coefficients",
    "write_expert_fits",
    "write_threshold_table",
]

_SOURCE_PREFIX = "coefficients: scripts/calibrate.py"
# The preset `scripts/calibrate.py --write-config` adds to an entry that has none for the calibrated indicator,
# and the rule of its threshold: the largest of the measured threshold table up to which every threshold keeps
# the mean PSNR against uncached at or above MIN_PSNR_DB (30 dB: the lower of the two quality levels the README's
# benchmarks compare methods at; `--min-psnr` asks for another). Every smaller threshold must pass too, so a
# noisy table cannot pick a threshold above one that failed.
CALIBRATED_PRESET = "calibrated"
MIN_PSNR_DB = 30.0


def calibration_source(fit: PolynomialFit | BranchFits, previous_source: str = "") -> str:
    """A preset's `source` saying where its coefficients come from, keeping the threshold's justification."""
    rest = previous_source
    if rest.startswith(_SOURCE_PREFIX):
        rest = rest.split("; ", 1)[1] if "; " in rest else ""
    fits = as_branch_fits(fit)
    low, high = fits.calibrated_range
    if fits.per_branch:
        note = (
            f"{_SOURCE_PREFIX} fit per CFG branch on {fits.positive.num_points} + {fits.negative.num_points} points "
            f"(R^2 {fits.positive.r_squared:.3f} / {fits.negative.r_squared:.3f}, x in [{low:.3g}, {high:.3g}])"
        )
    else:
        note = (
            f"{_SOURCE_PREFIX} fit on {fits.joint.num_points} points (R^2 {fits.joint.r_squared:.3f}, "
            f"x in [{low:.3g}, {high:.3g}])"
        )
    return f"{note}; {rest}" if rest else note


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _is_content(line: str) -> bool:
    stripped = line.strip()
    return bool(stripped) and not stripped.startswith("#")


def _block_end(lines: list[str], start: int, indent: int) -> int:
    """Index after the lines that belong to the key at `start` (more indented than `indent`)."""
    end = start + 1
    while end < len(lines) and (not _is_content(lines[end]) or _indent(lines[end]) > indent):
        end += 1
    # Trailing blank or comment lines belong to what follows.
    while end > start + 1 and not _is_content(lines[end - 1]):
        end -= 1
    return end


def _find_key(lines: list[str], key: str, start: int, end: int, indent: int | None) -> int | None:
    pattern = re.compile(rf"^( *){re.escape(key)}:(\s|$)")
    for index in range(start, end):
        match = pattern.match(lines[index])
        if match and (indent is None or len(match.group(1)) == indent):
            return index
    return None


def _set_key(lines: list[str], start: int, end: int, child_indent: int, key: str, value: str) -> None:
    """Replace the value (with any continuation lines) of `key` in lines[start:end], or insert it at `start`."""
    index = _find_key(lines, key, start, end, child_indent)
    new_line = f"{' ' * child_indent}{key}: {value}\n"
    if index is None:
        lines.insert(start, new_line)
        return
    lines[index : _block_end(lines, index, child_indent)] = [new_line]


def _drop_key(lines: list[str], start: int, end: int, child_indent: int, key: str) -> None:
    """Remove `key` (with any continuation lines) from lines[start:end], if it is there."""
    index = _find_key(lines, key, start, end, child_indent)
    if index is not None:
        del lines[index : _block_end(lines, index, child_indent)]


def _coefficients_text(coefficients: Sequence[float]) -> str:
    return "[" + ", ".join(f"{c:.8e}" for c in coefficients) + "]"


def _range_text(fits: BranchFits | tuple[float, float]) -> str:
    low, high = fits.calibrated_range if isinstance(fits, BranchFits) else fits
    return f"[{low:.6g}, {high:.6g}]"


def _check_written(path: Path, where: str, written: Any, fits: BranchFits | TeaCacheParams) -> None:
    """`written` (a preset's params or a fit read back by the zoo loader) holds the polynomials of `fits`."""

    def same(a: Sequence[float] | None, b: Sequence[float] | None) -> bool:
        if a is None or b is None:
            return a is b
        return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-7) for x, y in zip(a, b, strict=True))

    if not (
        same(written.coefficients, fits.coefficients)
        and same(written.coefficients_negative, fits.coefficients_negative)
    ):
        raise RuntimeError(f"{path}: {where} did not take the new coefficients")


def presets_using(
    presets: Mapping[str, Mapping[str, Any]],
    indicator: str,
    default_indicator: str,
    use_ret_steps: bool | None = None,
) -> list[str]:
    """Names of the presets (a zoo config's `teacache.presets`, as read from YAML) that use `indicator`: a preset
    without an `indicator` key uses `default_indicator`; `use_ret_steps` True or False keeps that mode only."""
    return [
        name
        for name, preset in presets.items()
        if (preset.get("indicator") or default_indicator) == indicator
        and (use_ret_steps is None or bool(preset.get("use_ret_steps", False)) == use_ret_steps)
    ]


def write_coefficients(
    config_path: str | Path,
    indicator: str,
    fit: PolynomialFit | BranchFits,
    default_indicator: str,
    use_ret_steps: bool | None = None,
) -> list[str]:
    """Set the coefficients (and `coefficients_negative` where the branches have their own fits, else remove
    it), their `calibrated_range` (the indicator distances fitted on) and `source` of every preset of a zoo
    config that uses `indicator`, and of the entry's fit for it in `teacache.fits`, if it has one there.

    Edits the YAML text so comments and every other key stay as they are. A preset without an `indicator` key
    uses `default_indicator` (the model's default). `use_ret_steps` True or False limits the update to presets
    of that mode. A forecast preset (`method: forecast`) keeps its `source`, which justifies its threshold, not a
    fit: it gets the new polynomials only if it carries its own, else it takes them from the others when the
    file is read. A fit in `teacache.fits` is rewritten whole: its new source says where it comes from and a
    `borrowed_from` goes (the fit is now the checkpoint's own). Returns the names of the presets written; the
    file is written only once the zoo loader reads the result, so a broken result fails here.
    """
    import yaml

    from .zoo import EXPERT_NAMES

    path = Path(config_path)
    text = path.read_text()
    teacache_data = (yaml.safe_load(text) or {}).get("teacache") or {}
    presets = teacache_data.get("presets") or {}
    entry_fits = teacache_data.get("fits") or {}
    # A fit keyed by indicator (per-expert fits are `write_expert_fits`' business).
    in_fits = indicator in entry_fits and not set(entry_fits) & set(EXPERT_NAMES)
    chosen = presets_using(presets, indicator, default_indicator, use_ret_steps)
    if not chosen and not in_fits:
        raise ValueError(
            f"{path} has no TeaCache preset using indicator {indicator!r}"
            + ("" if use_ret_steps is None else f" with use_ret_steps={use_ret_steps}")
            + f" and no teacache.fits entry for it; its presets: {sorted(presets)}"
        )
    # A forecast preset needs no fit (its coefficients only feed the fit monitor): one that carries none
    # inherits the fit written into the others, and its source is never rewritten.
    forecast = {name for name in chosen if presets[name].get("method") == FORECAST}
    written = [name for name in chosen if name not in forecast or presets[name].get("coefficients") is not None]
    if in_fits:
        # The fit goes to teacache.fits; presets that carry no coefficients take it from there.
        written = [name for name in written if presets[name].get("coefficients") is not None]
    if not written and not in_fits:
        raise ValueError(
            f"{path}: the presets using indicator {indicator!r} ({chosen}) are forecast presets without "
            "coefficients; give one of them a `coefficients:` line (or add a TeaCache preset) to write the fit to"
        )
    lines = text.splitlines(keepends=True)
    teacache = _find_key(lines, "teacache", 0, len(lines), 0)
    teacache_end = None if teacache is None else _block_end(lines, teacache, 0)
    presets_at = None if teacache is None else _find_key(lines, "presets", teacache + 1, teacache_end, None)
    if presets_at is None:
        raise ValueError(f"{path}: expected a block-style 'teacache:' mapping with a 'presets:' key")
    presets_indent = _indent(lines[presets_at])
    fits = as_branch_fits(fit)
    for name in written:
        presets_end = _block_end(lines, presets_at, presets_indent)
        header = next(
            i
            for i in range(presets_at + 1, presets_end)
            if _is_content(lines[i]) and _indent(lines[i]) > presets_indent and lines[i].strip().startswith(f"{name}:")
        )
        header_indent = _indent(lines[header])
        end = _block_end(lines, header, header_indent)
        child_indent = next((_indent(line) for line in lines[header + 1 : end] if _is_content(line)), None)
        if child_indent is None:
            raise ValueError(f"{path}: preset {name!r} is written in flow style ({{...}}); write it as a block first")
        source = calibration_source(fits, str(presets[name].get("source", "")))
        values = {} if name in forecast else {"source": _yaml_string(source)}
        values |= {
            "coefficients": _coefficients_text(fits.coefficients),
            "coefficients_negative": fits.coefficients_negative and _coefficients_text(fits.coefficients_negative),
            "calibrated_range": _range_text(fits),
        }
        for key, value in values.items():
            end = _block_end(lines, header, header_indent)
            if value is None:
                _drop_key(lines, header + 1, end, child_indent, key)
            else:
                _set_key(lines, header + 1, end, child_indent, key, value)
    if in_fits:
        _replace_fit(lines, teacache, indicator, fits)
    entry = _write_checked(path, "".join(lines))
    if in_fits:
        _check_written(path, f"teacache.fits.{indicator}", entry.fits[indicator], fits)
    for name in chosen:
        _check_written(path, f"preset {name!r}", entry.presets[name].params, fits)
    return written


def _replace_fit(lines: list[str], teacache: int, indicator: str, fits: BranchFits) -> None:
    """Replace the block (or flow-style line) of `teacache.fits.<indicator>` with the new fit, in block style."""
    end = _block_end(lines, teacache, 0)
    step = next(_indent(line) for line in lines[teacache + 1 : end] if _is_content(line))
    fits_at = _find_key(lines, "fits", teacache + 1, end, step)
    if fits_at is None:
        raise ValueError("expected a block-style 'teacache.fits:' mapping")
    at = _find_key(lines, indicator, fits_at + 1, _block_end(lines, fits_at, step), None)
    if at is None:
        raise ValueError(f"expected a block-style 'teacache.fits:' mapping with a '{indicator}:' key")
    indent = _indent(lines[at])
    values = {
        "coefficients": _coefficients_text(fits.coefficients),
        "coefficients_negative": fits.coefficients_negative and _coefficients_text(fits.coefficients_negative),
        "calibrated_range": _range_text(fits),
        "source": _yaml_string(calibration_source(fits)),
    }
    block = [f"{' ' * indent}{indicator}:\n"]
    block += [f"{' ' * (indent + step)}{key}: {value}\n" for key, value in values.items() if value is not None]
    lines[at : _block_end(lines, at, indent)] = block


def _yaml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_expert_fits(config_path: str | Path, indicator: str, fits: Mapping[str, PolynomialFit | BranchFits]) -> None:
    """Set each expert's fit of `indicator` in `teacache.fits` of a two-expert zoo config ({expert: {indicator:
    {coefficients, coefficients_negative (where the expert's branches differ), calibrated_range, source}}});
    fits of other indicators are kept (shared ones are copied to each expert).

    Rewrites the `fits:` block (comments inside it are dropped; every other line stays as it is); the file is
    written only once the zoo loader reads the result, so a broken result fails here and leaves it as it was.
    """
    import yaml

    from .zoo import EXPERT_NAMES

    if set(fits) != set(EXPERT_NAMES):
        raise ValueError(f"fits must hold one fit per expert {list(EXPERT_NAMES)}, got {sorted(fits)}")
    path = Path(config_path)
    text = path.read_text()
    teacache_data = (yaml.safe_load(text) or {}).get("teacache") or {}
    presets = (teacache_data.get("presets") or {}).items()
    carrying = [name for name, preset in presets if {"coefficients", "calibrated_range"} & set(preset)]
    if carrying:
        raise ValueError(
            f"{path}: presets {carrying} carry coefficients or a calibrated range, which would override both "
            "experts' fits: move them to teacache.fits first"
        )
    old = teacache_data.get("fits") or {}
    per_expert = old if any(name in EXPERT_NAMES for name in old) else {name: old for name in EXPERT_NAMES}
    lines = text.splitlines(keepends=True)
    teacache = _find_key(lines, "teacache", 0, len(lines), 0)
    if teacache is None:
        raise ValueError(f"{path}: expected a block-style 'teacache:' mapping")
    end = _block_end(lines, teacache, 0)
    step = next(_indent(line) for line in lines[teacache + 1 : end] if _is_content(line))
    block = [f"{' ' * step}fits:\n"]
    for expert in EXPERT_NAMES:
        block.append(f"{' ' * 2 * step}{expert}:\n")
        expert_fits = dict(per_expert.get(expert) or {})
        fit = as_branch_fits(fits[expert])
        expert_fits[indicator] = {
            "coefficients": _coefficients_text(fit.coefficients),
            **({"coefficients_negative": _coefficients_text(fit.coefficients_negative)} if fit.per_branch else {}),
            "calibrated_range": _range_text(fit),
            "source": _yaml_string(calibration_source(fit)),
        }
        for name, entry in expert_fits.items():
            block.append(f"{' ' * 3 * step}{name}:\n")
            for key, value in entry.items():
                if name != indicator:
                    value = _yaml_string(str(value)) if isinstance(value, str) else json.dumps(value)
                block.append(f"{' ' * 4 * step}{key}: {value}\n")
    index = _find_key(lines, "fits", teacache + 1, end, step)
    if index is None:
        lines[teacache + 1 : teacache + 1] = block
    else:
        lines[index : _block_end(lines, index, step)] = block
    entry = _write_checked(path, "".join(lines))
    for expert, fit in fits.items():
        _check_written(path, f"expert {expert!r}", entry.rescaling_fits(expert)[indicator], as_branch_fits(fit))


def write_threshold_table(
    config_path: str | Path, preset: str, rows: Sequence[tuple[float, float, float]], source: str
) -> None:
    """Set `teacache.threshold_table` of a zoo config: the rows [threshold, mean computed fraction, mean PSNR dB]
    measured with preset `preset`'s settings. One flow-style line, so the rest of the file stays as it is."""

    path = Path(config_path)
    lines = path.read_text().splitlines(keepends=True)
    teacache = _find_key(lines, "teacache", 0, len(lines), 0)
    if teacache is None:
        raise ValueError(f"{path}: expected a block-style 'teacache:' mapping")
    end = _block_end(lines, teacache, 0)
    child_indent = next(_indent(line) for line in lines[teacache + 1 : end] if _is_content(line))
    cells = ", ".join(f"[{t:.6g}, {f:.4f}, {p:.2f}]" for t, f, p in rows)
    value = f"{{preset: {preset}, source: {_yaml_string(source)}, rows: [{cells}]}}"
    _set_key(lines, teacache + 1, end, child_indent, "threshold_table", value)
    table = _write_checked(path, "".join(lines)).threshold_table
    if table is None or len(table.rows) != len(rows):
        raise RuntimeError(f"{path}: the threshold table did not read back")


def _write_checked(path: Path, text: str) -> Any:
    """Write `text` to the zoo config `path` once the zoo loader reads it (tried as a file beside it, so relative
    LoRA paths resolve the same): a result the loader refuses raises its error and leaves `path` as it was."""
    from .zoo import load_zoo_entry

    trial = path.with_name(f".{path.stem}.writing{path.suffix}")
    trial.write_text(text)
    try:
        load_zoo_entry(trial)
    except ValueError as error:
        trial.unlink()
        raise ValueError(f"{str(error).replace(str(trial), str(path))} (the file was left as it was)") from None
    except BaseException:
        trial.unlink()
        raise
    trial.replace(path)
    return load_zoo_entry(path)


def threshold_for_psnr(
    rows: Sequence[tuple[float, float, float]], min_psnr_db: float = MIN_PSNR_DB
) -> tuple[float, float, float]:
    """The row [threshold, mean computed fraction, mean PSNR dB] of a measured threshold table with the largest
    threshold up to which every threshold keeps the mean PSNR at or above `min_psnr_db`."""
    if not rows:
        raise ValueError("the threshold table is empty: no threshold was measured")
    chosen = None
    for row in sorted(rows):
        if row[2] < min_psnr_db:
            break
        chosen = row
    if chosen is None:
        smallest = min(rows)
        raise ValueError(
            f"no measured threshold keeps a mean PSNR of {min_psnr_db:g} dB against uncached: the smallest, "
            f"{smallest[0]:g}, gives {smallest[2]:.2f} dB"
        )
    return chosen


def threshold_rule_note(
    rows: Sequence[tuple[float, float, float]],
    chosen: tuple[float, float, float],
    min_psnr_db: float,
    pairs: int,
    steps: int | None = None,
) -> str:
    """How a threshold chosen by `threshold_for_psnr` was chosen, with the numbers measured (on `pairs`
    prompt/seed pairs of `steps` steps): for a preset's `source`."""
    ordered = sorted(rows)
    above = ordered[ordered.index(chosen) + 1 :]
    after = (
        f"next measured, {above[0][0]:g}: {above[0][1]:.1%} computed, {above[0][2]:.2f} dB"
        if above
        else "the largest threshold measured"
    )
    return (
        f"threshold: scripts/calibrate.py, the largest measured threshold up to which the mean PSNR against "
        f"uncached stays >= {min_psnr_db:g} dB on {pairs} prompt/seed pairs"
        f"{'' if steps is None else f' of {steps} steps'}: {chosen[0]:g}, {chosen[1]:.1%} of the "
        f"block-stack calls computed, {chosen[2]:.2f} dB ({after}; every row in teacache.threshold_table)"
    )


def _preset_lines(params: TeaCacheParams, source: str, indent: int) -> list[str]:
    """YAML lines of a preset: the threshold and the indicator, every other field that differs from
    `TeaCacheParams`' defaults, and `source`."""
    import yaml

    defaults = TeaCacheParams()
    lines = []
    for field in dataclasses.fields(TeaCacheParams):
        value = getattr(params, field.name)
        always = field.name in ("teacache_thresh", "indicator")
        if value is None or (not always and value == getattr(defaults, field.name)):
            continue
        if field.name in ("coefficients", "coefficients_negative"):
            text = _coefficients_text(value)
        elif field.name == "calibrated_range":
            text = _range_text(value)
        elif isinstance(value, str) and re.fullmatch(r"[A-Za-z_][\w-]*", value) and yaml.safe_load(value) == value:
            text = value  # a plain name (indicator, method) reads as the hand-written presets do
        else:
            text = json.dumps(value)
        lines.append(f"{' ' * indent}{field.name}: {text}\n")
    return [*lines, f"{' ' * indent}source: {_yaml_string(source)}\n"]


def add_preset(
    config_path: str | Path, name: str, params: TeaCacheParams, source: str, make_default: bool = False
) -> None:
    """Add TeaCache preset `name` to a zoo config: `params`' threshold and indicator, its other fields that
    differ from `TeaCacheParams`' defaults (coefficients, `calibrated_range` ... where it carries them) and
    `source`, as a block after the existing presets (`presets: {}` becomes a block); `make_default` also sets
    `teacache.default` to it.

    Edits the YAML text so comments and every other key stay as they are; the file is written only once the zoo
    loader reads the result, so a broken result fails here and leaves it as it was.
    """
    import yaml

    path = Path(config_path)
    text = path.read_text()
    existing = ((yaml.safe_load(text) or {}).get("teacache") or {}).get("presets") or {}
    if name in existing:
        raise ValueError(f"{path} already has a TeaCache preset {name!r}; its presets: {sorted(existing)}")
    lines = text.splitlines(keepends=True)
    teacache = _find_key(lines, "teacache", 0, len(lines), 0)
    end = None if teacache is None else _block_end(lines, teacache, 0)
    step = None if teacache is None else next(_indent(line) for line in lines[teacache + 1 : end] if _is_content(line))
    presets_at = None if teacache is None else _find_key(lines, "presets", teacache + 1, end, step)
    if presets_at is None:
        raise ValueError(f"{path}: expected a block-style 'teacache:' mapping with a 'presets:' key")
    value = lines[presets_at].split(":", 1)[1].split("#", 1)[0].strip()
    if value == "{}":
        lines[presets_at] = f"{' ' * step}presets:\n"
    elif value:
        raise ValueError(f"{path}: teacache.presets is written in flow style ({value}); write it as a block first")
    presets_end = _block_end(lines, presets_at, step)
    # The new preset takes the indent of the presets already there, else one step more than `presets:`.
    indent = next((_indent(line) for line in lines[presets_at + 1 : presets_end] if _is_content(line)), 2 * step)
    lines[presets_end:presets_end] = [
        f"{' ' * indent}# Added by scripts/calibrate.py --write-config.\n",
        f"{' ' * indent}{name}:\n",
        *_preset_lines(params, source, indent + step),
    ]
    if make_default:
        _set_key(lines, teacache + 1, _block_end(lines, teacache, 0), step, "default", name)
    entry = _write_checked(path, "".join(lines))
    written = entry.presets[name].params
    if written.teacache_thresh != params.teacache_thresh or (make_default and entry.default_preset != name):
        raise RuntimeError(f"{path}: preset {name!r} did not read back as written")
    if params.coefficients is not None:
        _check_written(path, f"preset {name!r}", written, params)
