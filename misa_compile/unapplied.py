"""Settings that could not apply are said out loud. The graph pass records a refused site in its
report and leaves the model's own indexer in place, which is right for a site that is not a DSA
indexer, but a site refused because the requested MisaConfig does not fit it (`config_mismatch`,
e.g. active_heads above the site's H), or a compile/export that rewrote nothing at all, means the
user's setting was silently ignored. These helpers name such cases; export and the backend warn
with them and the command line turns them into a failing exit status."""
from __future__ import annotations

import warnings

from .passes.reasons import CONFIG_MISMATCH


class UnappliedSettingWarning(UserWarning):
    """A compile or export ran, but the requested MisaConfig did not apply to every site."""


def unapplied_settings(report, *, whole_model: bool) -> list[str]:
    """One line per thing that did not apply in `report` (a SiteReport): every site refused for
    config_mismatch, and "nothing rewritten" when no site was. `whole_model`: the report covers the
    whole model (export), so finding no site at all counts too; a compiled model's graphs are
    reported one by one and many hold no indexer, so there only graphs whose sites were all
    refused count."""
    lines = [f"site {site.name} refused ({CONFIG_MISMATCH}): {site.detail}"
             for site in report.refused if site.reason == CONFIG_MISMATCH]
    if not report.rewritten and (report.sites or whole_model):
        found = (f"all {len(report.sites)} indexer site(s) were refused" if report.sites
                 else "no DSA indexer site was found")
        lines.append(f"no indexer was rewritten: {found}, the model runs unchanged")
    return lines


def warn_unapplied(report, *, whole_model: bool, stacklevel: int = 2) -> list[str]:
    """Warns (UnappliedSettingWarning) with unapplied_settings(report, ...); returns its lines."""
    lines = unapplied_settings(report, whole_model=whole_model)
    if lines:
        warnings.warn("misa: requested settings did not apply:\n  " + "\n  ".join(lines),
                      UnappliedSettingWarning, stacklevel=stacklevel + 1)
    return lines
