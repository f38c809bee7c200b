"""What a terminal shows of a run with its progress bar: warnings and Lightning's closing line on lines of their
own (they were glued to the bar: `...val=1.96]UserWarning: ...`), the final bar once, and one line per validation
that stays on screen (issue 25.5)."""

import os
import re
import subprocess
import sys

from tests.faults.helpers import TINY, env, scalars

ESCAPE = re.compile(r"\x1b\[(\d*)([A-Za-z])")


def screen(output: str) -> list[str]:
    """The rows a terminal ends up showing for this byte stream: carriage returns overwrite the row, `ESC[nA`
    moves up (tqdm's nested bars), other escape sequences change nothing here."""
    rows, row, col = [[]], 0, 0
    index = 0
    while index < len(output):
        char = output[index]
        escape = ESCAPE.match(output, index)
        if escape:
            if escape.group(2) == "A":
                row = max(0, row - int(escape.group(1) or 1))
            index = escape.end()
            continue
        if char == "\r":
            col = 0
        elif char == "\n":
            row, col = row + 1, 0
            rows.extend([] for _ in range(row + 1 - len(rows)))
        else:
            line = rows[row]
            line.extend(" " for _ in range(col + 1 - len(line)))
            line[col] = char
            col += 1
        index += 1
    return [("".join(r)).rstrip() for r in rows]


def test_warnings_validations_and_the_closing_bar_each_get_a_line(tmp_path):
    command = [sys.executable, "-m", "diffv2_lit", "fit", "--config", str(TINY), "--trainer.enable_progress_bar", "true",
               "--trainer.max_steps", "8", "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "2",
               "--trainer.callbacks+=tests.cli.warn_callback.WarnAtStep", "--trainer.callbacks.step", "3"]
    # stdout (the bar) and stderr (warnings, Lightning's log lines) into one pipe, in the order they were written,
    # as a terminal receives them
    result = subprocess.run(command, cwd=tmp_path, env={**env(tmp_path), "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    output = result.stdout.decode()  # bytes: text mode would turn tqdm's carriage returns into newlines
    assert result.returncode == 0, output[-3000:]
    shown = screen(output)

    warning = [row for row in shown if "a warning raised at step 3, mid-run" in row]
    assert warning == ["UserWarning: a warning raised at step 3, mid-run"], shown
    assert "`Trainer.fit` stopped: `max_steps=8` reached." in shown, shown
    assert not [row for row in shown if "train:" in row and ("Warning" in row or "Trainer.fit" in row)], shown
    assert len([row for row in shown if row.startswith("train: 100%")]) == 1, shown

    logged = scalars(tmp_path / "runs" / "faults" / "version_0", "val/loss")  # TensorBoard's values, by step
    printed = [row for row in shown if row.startswith("validation at step ")]
    assert [re.match(r"validation at step (\d+): val/loss ([\d.]+)", row).groups() for row in printed] == \
        [(str(step), f"{value:.4g}") for step, value in zip((4, 8), [logged[s] for s in sorted(logged)])], printed
