"""``worldkv eval revisit``: revisit consistency of full KV, a sliding window and the WorldKV connector
(several keep ratios, policies and compressions) on the trained world model (worldkv_connector/world)
or on any checkpoint the backend loads; prints a table, the acceptance checks, and writes --json / --plot."""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

__all__ = ["register", "run_revisit"]

_MiB = 1 << 20


def register(sub: argparse._SubParsersAction) -> None:
    from worldkv_connector.world.revisit import DEFAULT_MODES, OBSERVE, RevisitConfig
    from worldkv_connector.world.trajectories import REVISIT_TRAJECTORIES

    d = RevisitConfig()
    parser = sub.add_parser("eval", help="quality evals (revisit: memory fidelity on revisits)",
                            description="Quality evals of the world memory.")
    what = parser.add_subparsers(dest="eval", metavar="WHAT", required=True)
    p = what.add_parser("revisit", help="PSNR / SSIM of revisits vs first visits, per mode, with throughput and memory",
                        description="Roll the model out through the engine on revisit trajectories with every mode and "
                        "compare each revisit frame with the first visit of its pose (and the ground truth).")
    p.add_argument("--model", default=d.model, help=f"named model config (default {d.model}: the trained world model)")
    p.add_argument("--checkpoint", metavar="PATH", help="safetensors checkpoint (default for --model world: the "
                   "shipped trained weights)")
    p.add_argument("--num-chunks", type=int, default=d.num_chunks, help=f"chunks per rollout (default {d.num_chunks})")
    p.add_argument("--trajectories", default=",".join(d.trajectories),
                   help=f"comma-separated, from {sorted(REVISIT_TRAJECTORIES)} (default all)")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"comma-separated modes (default {','.join(DEFAULT_MODES)})")
    p.add_argument("--num-denoising-steps", type=int, default=d.num_denoising_steps,
                   help=f"denoising steps per chunk (default {d.num_denoising_steps})")
    p.add_argument("--timestep-shift", type=float, default=d.timestep_shift,
                   help=f"flow-matching sigma shift (default {d.timestep_shift})")
    p.add_argument("--observe", choices=OBSERVE, default=d.observe,
                   help="first-visits: chunks that see a place for the first time are the ground truth (the model "
                   "still writes their K/V), revisits are generated; none: every chunk generated (default)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"noise seed (default {d.seed})")
    p.add_argument("--world-seed", type=int, default=d.world_seed, help=f"first held-out world (default {d.world_seed})")
    p.add_argument("--device", default=d.device, help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    p.add_argument("--plot", metavar="PATH.png", help="write a contact sheet (first visit vs revisit per mode)")
    p.add_argument("--quiet", action="store_true", help="no per-rollout progress lines")
    p.set_defaults(func=run_revisit)


def _parse_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _fmt(x, spec: str) -> str:
    width = int(spec.split(".")[0]) if spec[0].isdigit() else 0
    return "n/a".rjust(width) if x is None else format(x, spec)


def print_table(report: dict) -> None:
    head = (f"{'mode':<14} {'PSNR dB':>8} {'+-':>5} {'SSIM':>6} {'PSNR gt':>8} {'SSIM gt':>7} {'pairs':>5} "
            f"{'chunks/s':>8} {'KV MiB':>7} {'peak KV':>7} {'bank MiB':>8}")
    print(head)
    print("-" * len(head))
    for mode, s in report["modes"].items():
        print(f"{mode:<14} {_fmt(s['revisit_psnr_db'], '8.2f')} {_fmt(s['revisit_psnr_std_db'], '5.1f')} "
              f"{_fmt(s['revisit_ssim'], '6.3f')} {_fmt(s['revisit_psnr_gt_db'], '8.2f')} "
              f"{_fmt(s['revisit_ssim_gt'], '7.3f')} {s['revisit_pairs']:>5} {s['chunks_per_s']:>8.2f} "
              f"{s['resident_kv_bytes_last'] / _MiB:>7.3f} {s['peak_resident_kv_bytes'] / _MiB:>7.3f} "
              f"{s['bank_peak_bytes'] / _MiB:>8.3f}")


def acceptance(report: dict) -> list[tuple[str, bool | None, str]]:
    """The issue's checks, from this run's figures: (check, passed or None if not measurable, figures)."""
    m = report["modes"]
    p = {k: v["revisit_psnr_db"] for k, v in m.items()}
    c = {k: v["chunks_per_s"] for k, v in m.items()}
    out = []
    if p.get("full") is not None and p.get("sliding") is not None:
        out.append(("memory matters: full >= sliding + 6 dB", p["full"] >= p["sliding"] + 6,
                    f"full {p['full']:.2f} dB, sliding {p['sliding']:.2f} dB"))
    if p.get("full") is not None and p.get("worldkv") is not None:
        out.append(("worldkv keeps it: worldkv >= full - 1 dB", p["worldkv"] >= p["full"] - 1,
                    f"worldkv {p['worldkv']:.2f} dB, full {p['full']:.2f} dB"))
    if c.get("full") and c.get("worldkv") is not None:
        out.append((f"worldkv >= 2x full chunks/s over {report['num_chunks']} chunks", c["worldkv"] >= 2 * c["full"],
                    f"worldkv {c['worldkv']:.2f}, full {c['full']:.2f} chunks/s ({c['worldkv'] / c['full']:.2f}x)"))
    if p.get("tempcache") is not None and p.get("worldkv") is not None:
        out.append(("tempcache beside novelty at equal storage (reported, no threshold)", None,
                    f"tempcache {p['tempcache']:.2f} dB vs worldkv {p['worldkv']:.2f} dB; bank "
                    f"{m['tempcache']['bank_peak_bytes'] / _MiB:.3f} vs {m['worldkv']['bank_peak_bytes'] / _MiB:.3f} MiB"))
    return out


def run_revisit(args: argparse.Namespace) -> int:
    import torch

    from worldkv_connector.cli.generate import cpu_threads
    from worldkv_connector.world.revisit import RevisitConfig, evaluate, report_json

    if args.plot and not args.plot.endswith(".png"):
        raise ValueError(f"--plot {args.plot}: expected a .png path")
    if args.checkpoint and not Path(args.checkpoint).exists():
        raise FileNotFoundError(f"--checkpoint {args.checkpoint}: no such file or directory")
    cfg = RevisitConfig(model=args.model, checkpoint=args.checkpoint, trajectories=_parse_list(args.trajectories),
                        modes=_parse_list(args.modes), num_chunks=args.num_chunks,
                        num_denoising_steps=args.num_denoising_steps, timestep_shift=args.timestep_shift,
                        seed=args.seed, world_seed=args.world_seed, observe=args.observe, device=args.device)
    progress = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    with cpu_threads(args.threads):
        threads = torch.get_num_threads()  # the count the rollouts ran with (restored on leaving)
        report = evaluate(cfg, progress)
    machine = f"{platform.machine()}, {threads} thread(s), torch {torch.__version__}, {args.device}"
    weights = Path(report["checkpoint"]).name if report["checkpoint"] else "random weights"
    print(f"revisit eval: model {cfg.model} ({weights}), {cfg.num_chunks} chunks x "
          f"{len(cfg.trajectories)} trajectories ({', '.join(cfg.trajectories)}), observe {cfg.observe}, "
          f"{cfg.num_denoising_steps} denoising steps; {machine}")
    for name, t in report["trajectories"].items():
        print(f"  {name}: {t['revisit_pairs']} revisit pairs, {t['observed_chunks']} observed chunks")
    print()
    print_table(report)
    print()
    names = list(report["trajectories"])
    print("revisit PSNR dB per trajectory: " + ", ".join(
        f"{mode} " + "/".join(_fmt(s["revisit_psnr_db_by_trajectory"].get(t), ".1f") for t in names)
        for mode, s in report["modes"].items()) + f"  ({'/'.join(names)})")
    print()
    print("acceptance (this run):")
    for check, ok, figures in acceptance(report):
        verdict = "reported" if ok is None else ("PASS" if ok else "FAIL")
        print(f"  [{verdict}] {check}: {figures}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        doc = report_json(report)
        doc["machine"] = machine
        doc["acceptance"] = [{"check": c, "passed": ok, "figures": f} for c, ok, f in acceptance(report)]
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        from worldkv_connector.world.contact_sheet import write_contact_sheet

        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        write_contact_sheet(args.plot, report, f"revisit eval, {cfg.model}, observe {cfg.observe}")
        print(f"wrote {args.plot}")
    return 0
