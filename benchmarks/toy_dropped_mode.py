"""Does the audit see a dropped mode? Two planted ring8 generators, scored and audited.

* ``dropped-renorm`` -- mode 0 of ring8 never generated; its mass goes to the other seven
  (each 1/7 instead of 1/8): the remaining modes are denser than the real data.
* ``dropped-junk`` -- mode 0 never generated; its 1/8 of the mass is spread uniformly over the
  square [-3, 3]^2 (poor samples): every generated mode keeps exactly its true mass.

Both are TorchScript generators (latents (n, 3) -> points), scored with `toy score`'s code and
audited like the trained checkpoints (`--descriptor rff --reference-generator toy:ring8`).

    .venv/bin/python benchmarks/toy_dropped_mode.py --out runs/toy-dropped --json benchmarks/toy_dropped_mode.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="modeaudit-toy-prefect-")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import torch  # noqa: E402


class DroppedMode(torch.nn.Module):
    """ring8 without mode 0; `junk` = its mass as uniform points on [-3, 3]^2, else renormalised."""

    def __init__(self, junk: bool, sd: float = 0.001):
        super().__init__()
        a = torch.arange(8, dtype=torch.float32) * torch.pi / 4
        self.register_buffer("means", torch.stack([2 * torch.cos(a), 2 * torch.sin(a)], 1))
        self.junk, self.sd = junk, sd

    def forward(self, z):
        u = torch.special.ndtr(z[:, 0])
        lo = 0.125 if self.junk else 0.0
        k = 1 + torch.clamp(((u - lo) / (1 - lo) * 7).floor().long(), 0, 6)
        x = self.means[k] + self.sd * z[:, 1:3]
        if self.junk:
            flat = 6 * torch.special.ndtr(z[:, 1:3]) - 3
            x = torch.where((u < lo).unsqueeze(1), flat, x)
        return x


def main() -> int:
    """Score and audit both planted generators; write one JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/toy-dropped")
    ap.add_argument("--json", default="benchmarks/toy_dropped_mode.json")
    ap.add_argument("--bandwidths", default="1.0,0.5", help="rff bandwidths to audit with")
    a = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from toy_table import _audit
    from modeaudit.flows.toy_cli import score_generator
    from prefect.testing.utilities import prefect_test_harness
    out, rows = Path(a.out), []
    out.mkdir(parents=True, exist_ok=True)
    with prefect_test_harness(server_startup_timeout=180):
        for name, junk in (("dropped-renorm", False), ("dropped-junk", True)):
            ckpt = out / f"{name}.pt"
            torch.jit.save(torch.jit.script(DroppedMode(junk)), str(ckpt))
            _, m = score_generator("ring8", f"torchscript:{ckpt}", {"latent_dim": "3"}, 50_000)
            for h in (float(b) for b in a.bandwidths.split(",")):
                au = _audit(["--generator", f"torchscript:{ckpt}", "-G", "latent_dim=3"], out / f"{name}-h{h:g}",
                            "ring8", "demo", h)
                rows.append({"generator": name, "bandwidth": h, "truth": {k: m[k] for k in (
                    "modes_covered", "quality", "reverse_kl", "mode_shares")}, "audit": au})
                print(json.dumps(rows[-1]), flush=True)
    Path(a.json).write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "runs": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
