"""What a person watching the run sees: a tqdm bar on a terminal, plain log lines otherwise.

Only the main process shows anything; the other ranks get a silent instance.
"""

from __future__ import annotations

import sys
import time


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    def __init__(self, total_steps: int, *, enabled: bool, stream=None):
        self.total = total_steps
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self.bar = None
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True, file=self.stream)

    def message(self, text: str) -> None:
        """A line that stays (run set-up, epoch results)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, file=self.stream, flush=True)

    def update(self, step: int, epoch: int, fields: dict[str, float], *, log_line: bool) -> None:
        """Advance to optimizer step ``step`` (1-based); ``fields`` are shown as key=value."""
        if not self.enabled:
            return
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in fields.items()}
        if self.bar is not None:
            self.bar.set_description(f"epoch {epoch}", refresh=False)
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(step - self.bar.n)
        elif log_line:
            elapsed = time.perf_counter() - self.start
            eta = elapsed / step * (self.total - step) if step else 0.0
            pairs = " ".join(f"{k}={v}" for k, v in shown.items())
            print(f"epoch {epoch} step {step}/{self.total} {pairs} eta={_fmt_time(eta)}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
