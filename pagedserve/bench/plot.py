"""`--plot FILE.png`: a serving benchmark's latency CDFs and its throughput over time, in one figure."""

from __future__ import annotations


def _cdf(ax, values_ms: list[float], title: str) -> None:
    xs = sorted(values_ms)
    if xs:
        ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], drawstyle="steps-post")
    ax.set_title(title)
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction of samples")
    ax.grid(True, alpha=0.3)


def plot_result(result: dict, path: str) -> None:
    """TTFT and ITL CDFs, and output chunks per second over the run (matplotlib, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [not e for e in result["errors"]]
    fig, (ax_ttft, ax_itl, ax_tput) = plt.subplots(1, 3, figsize=(15, 4.2))
    _cdf(ax_ttft, [t * 1000 for t, good in zip(result["ttfts"], ok) if good], "TTFT CDF")
    _cdf(ax_itl, [x * 1000 for itl in result["itls"] for x in itl], "ITL CDF")
    seconds = int(result["duration"]) + 1
    per_second = [0] * seconds
    for times in result["token_times"]:
        for t in times:
            per_second[min(int(t), seconds - 1)] += 1
    ax_tput.plot(range(seconds), per_second, drawstyle="steps-post")
    ax_tput.set_title("output chunks per second")
    ax_tput.set_xlabel("seconds since start")
    ax_tput.grid(True, alpha=0.3)
    fig.suptitle(
        f"{result.get('model_id', '')}: {result['completed']} requests, "
        f"{result['output_throughput']:.1f} output tok/s, max concurrency {result.get('max_concurrency')}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
