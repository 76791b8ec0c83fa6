"""PNG export of Plotly figures, degrading to HTML only when no exporter works here.

Kaleido 0.2 bundles its own headless Chromium; it is driven directly with Plotly's own
plotly.js (Plotly 6+ no longer drives Kaleido 0.2 itself). Kaleido 1.x needs a Chrome on the
machine and is tried second. When neither works the HTML figures are still written and the
reason is reported once.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import plotly
import plotly.graph_objects as go

log = logging.getLogger(__name__)

WIDTH_PX = 1200
HEIGHT_PX = 500


class PngWriter:
    """Writes figures as PNG while an exporter works; remembers why not once one failed."""

    def __init__(self) -> None:
        self._scope: Any = None
        self.problem: str | None = None
        """Why PNGs are not written (None: they are, or none was tried yet)."""
        self.written: list[Path] = []

    def _bundled_scope(self) -> Any:
        if self._scope is None:
            from kaleido.scopes.plotly import PlotlyScope

            js = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
            self._scope = PlotlyScope(plotlyjs=str(js) if js.is_file() else None)
        return self._scope

    def write(self, fig: go.Figure, path: Path) -> bool:
        """``fig`` as PNG at ``path``; False (and ``problem`` set) when no exporter works."""
        if self.problem is not None:
            return False
        width = int(fig.layout.width or WIDTH_PX)
        height = int(fig.layout.height or HEIGHT_PX)
        errors = []
        try:
            scope = self._bundled_scope()
            data = scope.transform(
                json.loads(fig.to_json()), format="png", width=width, height=height
            )
            path.write_bytes(data)
            self.written.append(path)
            return True
        except Exception as exc:  # ImportError, or the exporter's own errors (many kinds)
            errors.append(f"kaleido 0.2: {type(exc).__name__}: {str(exc)[:200]}")
        try:
            fig.write_image(path, width=width, height=height)
            self.written.append(path)
            return True
        except Exception as exc:  # plotly raises ValueError/RuntimeError without Chrome
            errors.append(f"plotly/kaleido: {type(exc).__name__}: {str(exc).strip()[:200]}")
        self.problem = (
            "PNG figures not written (the HTML ones are): "
            + "; ".join(errors)
            + ". Install the exporter with: pip install 'kaleido==0.2.1'"
        )
        log.warning("%s", self.problem)
        return False

    def close(self) -> None:
        """End the exporter's browser process, if one was started."""
        if self._scope is not None:
            with contextlib.suppress(Exception):
                self._scope._shutdown_kaleido()
            self._scope = None
