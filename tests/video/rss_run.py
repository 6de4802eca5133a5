"""Run ``worldkv generate`` (the CLI's own code) and sample this process's RSS as chunks complete.

    python tests/video/rss_run.py CHUNKS FROM_CHUNK [generate flags...]

Prints one JSON line: {"chunks": n, "rss_from": bytes at chunk FROM_CHUNK, "rss_end": bytes at the
last chunk, "rss_max": the largest sample after FROM_CHUNK}. Used by test_cli_robustness.py and to
measure issue 13's 6,000-chunk acceptance figure.
"""
import json
import os
import sys

from worldkv_connector.cli import main
from worldkv_connector.cli import outputs


def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run(chunks: int, start: int, flags: list[str]) -> dict:
    samples = {}
    add = outputs.RunOutputs.add

    def sampled(self, result) -> None:
        add(self, result)
        n = self.stats.chunks
        if n >= start and (n % 50 == 0 or n == chunks):
            samples[n] = rss()

    outputs.RunOutputs.add = sampled
    try:
        rc = main(["generate", "--num-chunks", str(chunks), "--no-progress", *flags])
    finally:
        outputs.RunOutputs.add = add
    assert rc == 0, rc
    last = max(samples)
    return {"chunks": last, "rss_from": samples[min(samples)], "rss_end": samples[last],
            "rss_max": max(samples.values())}


if __name__ == "__main__":
    print(json.dumps(run(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])))
