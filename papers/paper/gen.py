#!/usr/bin/env python3
"""Turns papers/results/*.json into the tables (LaTeX) and plot data (.dat) the paper includes.

Every number in the paper's tables and figures comes from here; nothing is typed by hand.
Usage: gen.py RESULTS_DIR OUT_DIR
"""
import csv
import json
import math
import os
import sys


def fmt(x, digits=0):
    if x is None:
        return "--"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if digits == 0:
        return f"{int(round(x)):,}".replace(",", "{,}")
    return f"{x:,.{digits}f}".replace(",", "{,}")


def load(results, name):
    with open(os.path.join(results, name)) as f:
        return json.load(f)


def write(out, name, text):
    with open(os.path.join(out, name), "w") as f:
        f.write(text)


def tabular(spec, header, rows):
    lines = [f"\\begin{{tabular}}{{{spec}}}", "\\toprule", " & ".join(header) + " \\\\", "\\midrule"]
    lines += [" & ".join(str(c) for c in r) + " \\\\" for r in rows]
    lines += ["\\bottomrule", "\\end{tabular}", ""]
    return "\n".join(lines)


def gossip(results, out):
    d = load(results, "gossip.json")
    rows, dat = [], ["n mean meanbound p99 p99bound lossymean"]
    for r in d["idealised"]["rows"]:
        c, l = r["clean"], r["lossy"]
        rows.append([fmt(r["n"]), fmt(c["mean"], 2), fmt(r["mean_bound"], 2), fmt(c["p99"]), fmt(r["p99_bound"]),
                     fmt(l["mean"], 2), fmt(l["p99"]), fmt(r["lossy_mean_over_clean_mean"], 2)])
        dat.append(f"{r['n']} {c['mean']} {r['mean_bound']} {c['p99']} {r['p99_bound']} {l['mean']}")
    write(out, "gossip-idealised.tex", tabular("rrrrrrrr", ["$N$", "mean", "bound", "p99", "bound", "lossy mean", "lossy p99", "ratio"], rows))
    write(out, "gossip-idealised.dat", "\n".join(dat) + "\n")
    topo = d["timed"]["topologies"]
    names = [t["name"] for t in topo]
    by_n = {}
    for t in topo:
        for r in t["rows"]:
            by_n.setdefault(r["n"], {})[t["name"]] = r
    rows = []
    dat = ["n " + " ".join(n.replace(" ", "") for n in names)]
    for n in sorted(by_n):
        cells = [by_n[n].get(name) for name in names]
        rows.append([fmt(n)] + [f"{fmt(c['rounds_mean'], 2)} ({fmt(c['rounds_p99'], 2)})" if c else "--" for c in cells])
        dat.append(f"{n} " + " ".join(str(c["rounds_mean"]) if c else "nan" for c in cells))
    write(out, "gossip-timed.tex", tabular("r" + "r" * len(names), ["$N$"] + names, rows))
    write(out, "gossip-timed.dat", "\n".join(dat) + "\n")


def clock_skew(results, out):
    d = load(results, "clock-skew.json")
    gaps = sorted(set(c["gap_mean_ms"] for c in d["cells"]))
    skews = sorted(set(c["skew_ms"] for c in d["cells"]))
    cell = {(c["gap_mean_ms"], c["skew_ms"]): c for c in d["cells"]}
    dat = ["skew " + " ".join(f"g{int(g)}" for g in gaps)]
    for s in skews:
        dat.append(f"{max(s, 0.1)} " + " ".join(str(cell[(g, s)]["rate"]) if (g, s) in cell else "nan" for g in gaps))
    write(out, "clock-skew.dat", "\n".join(dat) + "\n")
    rows = []
    for s in skews:
        rows.append([fmt(s)] + [fmt(100 * cell[(g, s)]["rate"], 1) if (g, s) in cell else "--" for g in gaps])
    write(out, "clock-skew.tex", tabular("r" + "r" * len(gaps), ["skew (ms)"] + [f"gap {fmt(g)} ms" for g in gaps], rows))
    write(out, "clock-skew-trials.tex", fmt(d["trials_per_cell"]))


def symmetric_nat(results, out):
    with open(os.path.join(results, "symmetric-nat", "sweep.csv")) as f:
        runs = list(csv.DictReader(f))
    cells = {}
    for r in runs:
        cells.setdefault((int(r["nat.symmetric_ppm"]), r["network.relay"]), []).append(r)
    rows, dat = [], {"true": ["share to100 failed"], "false": ["share to100 failed"]}
    for (ppm, relay), rs in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1] == "false")):
        conv = [r for r in rs if r["converged"] == "true"]
        mean = lambda key, rr: sum(float(r[key]) for r in rr) / len(rr) if rr else None
        to50, to100 = mean("online_to_50_ms_p50", conv), mean("online_to_100_ms_p50", conv)
        failed = mean("sessions_failed", rs)
        rows.append([f"{ppm // 10000}\\%", "yes" if relay == "true" else "no", f"{len(conv)}/{len(rs)}", fmt(to50), fmt(to100),
                     fmt(failed), f"{fmt(mean('direct_paths', rs))} / {fmt(mean('relayed_paths', rs))}", fmt(mean("datagrams_unrelayed", rs))])
        dat[relay].append(f"{ppm / 10000} {to100 if to100 is not None else 'nan'} {failed}")
    write(out, "symnat.tex", tabular("rcrrrrrr", ["symmetric", "relay", "converged", "50\\% (ms)", "100\\% (ms)", "failed sessions", "punched / relayed", "undeliverable"], rows))
    write(out, "symnat-relay.dat", "\n".join(dat["true"]) + "\n")
    write(out, "symnat-norelay.dat", "\n".join(dat["false"]) + "\n")


def swarm(results, out):
    d = load(results, "swarm-campaign.json")
    s = d["summary"]
    labels = [("seeds", "seeds"), ("devices", "devices simulated"), ("events", "events"), ("sessions_started", "sync sessions"),
              ("sessions_failed", "sessions failed (faults)"), ("writes", "writes"), ("direct_paths", "device pairs punched"),
              ("relayed_paths", "device pairs relayed"), ("crashes_before_commit", "crashes before commit"),
              ("cloud_crashes", "cloud crashes"), ("stores_lost", "stores lost"), ("failed", "seeds failed")]
    rows = [[label, fmt(s[k])] for k, label in labels if k in s]
    rows.append(["wall time, one core", f"{fmt(d['run_ms'] / 60000, 1)} min"])
    write(out, "swarm.tex", tabular("lr", ["campaign", ""], rows))
    drawn = sorted(s["drawn"].items())
    half = (len(drawn) + 1) // 2
    rows = []
    for i in range(half):
        left = drawn[i]
        right = drawn[i + half] if i + half < len(drawn) else ("", None)
        rows.append([left[0], fmt(left[1]), right[0], fmt(right[1]) if right[1] is not None else ""])
    write(out, "swarm-drawn.tex", tabular("lrlr", ["option", "seeds", "option", "seeds"], rows))
    frows = []
    for f in d.get("failures", []):
        frows.append([fmt(f["seed"]), fmt(f["devices"]), fmt(f["shrunk"]["devices"]), f["failure"].split(":")[0]])
    write(out, "swarm-failures.tex", tabular("rrrl", ["seed", "devices", "shrunk to", "check"], frows))


def model(results, out):
    d = load(results, "model-check.json")
    rows = []
    for c in d["configurations"]:
        f = c["faults"]
        faults = f"{f['lose']}/{f['duplicate']}/{f['corrupt']}/{f['early_timers']}" + (" fair" if f["timers_only_when_idle"] else "")
        held = sum(1 for p in c["properties"] if p["holds"])
        rows.append([c["configuration"], faults, fmt(c["writes_per_member"]), fmt(c["sessions"]), fmt(c["distinct_states"]),
                     fmt(c["generated_states"]), f"{held}/{len(c['properties'])}"])
    write(out, "model.tex", tabular("lcrrrrr", ["configuration", "lose/dup/corrupt/early", "writes", "sessions", "states", "generated", "properties"], rows))


def sync(results, out):
    d = load(results, "sync.json")
    rows = []
    for c in d["cells"]:
        if c["sides"] != "two" or c["n"] != 10000 or not c.get("automerge"):
            continue
        f, a = c["feedmesh"], c["automerge"]
        rows.append([fmt(c["n"]), fmt(c["d"]), c["state"], fmt(f["round_trips"]), fmt(f["bytes"]), fmt(f["beyond_payload_bytes"]),
                     fmt(f["beyond_over_lower_bound"], 1), fmt(a["bytes"]), fmt(c["automerge_bytes_over_feedmesh"], 1)])
    write(out, "sync.tex", tabular("rrlrrrrrr", ["$n$", "$d$", "cursors", "RTT", "bytes", "beyond", "/bound", "automerge", "ratio"], rows))


def perf(results, out):
    d = load(results, "perf.json")
    rows = [[h["figure"], fmt(h["value"], 2 if isinstance(h["value"], float) and h["value"] < 100 else 0), h.get("unit", "").replace("%", "\\%"),
             h["goal"].replace(">=", "$\\geq$").replace("<=", "$\\leq$").replace("%", "\\%"), "yes" if h["met"] else "no"] for h in d["headline"]]
    write(out, "perf.tex", tabular("lrllc", ["figure", "value", "unit", "goal", "met"], rows))
    m = d["machine"]
    write(out, "perf-machine.tex", f"{m['cpus']} vCPU {m['cpu_model']}, commit \\texttt{{{m['commit'][:7]}}}")


def merge(results, out):
    d = load(results, "merge.json")
    rows = []
    for c in d["cells"]:
        if "automerge" not in c or c["automerge"] is None:
            continue
        rows.append([fmt(c["items"]), str(c["concurrent"]).replace("%", "\\%"), fmt(c["history"]), fmt(c["feedmesh"]["items_per_sec"]),
                     fmt(c["automerge"]["items_per_sec"]), fmt(c["feedmesh_speedup_over_automerge"], 1)])
    write(out, "merge.tex", tabular("rrrrrr", ["$n$", "conflicts", "history", "feedmesh items/s", "automerge items/s", "speedup"], rows))


def content(results, out):
    d = load(results, "content.json")
    mib = lambda b: b / (1 << 20)
    names = {"nearest": "nearest first", "any": "any source", "cloud-only": "cloud only"}
    rows = []
    for r in d["runs"]:
        route = lambda k: fmt(mib(r["bytes_by_route"].get(k, 0)))
        rows.append([names.get(r["policy"], r["policy"]), fmt(r["lan_group_done_s"], 1), fmt(r["elsewhere_done_s"], 1),
                     fmt(r["median_done_s"], 1), route("lan"), route("direct"), route("relayed"), route("cloud"),
                     fmt(mib(r["writer_sent_bytes"]))])
    write(out, "content.tex", tabular("lrrrrrrrr", ["policy", "LAN group (s)", "elsewhere (s)", "median (s)", "LAN MiB",
                                                    "direct MiB", "relayed MiB", "cloud MiB", "writer sent MiB"], rows))
    # Share of devices holding the file over time, per policy (a step per device).
    for r in d["runs"]:
        done = sorted(t for t in r["done_s"] if t is not None)
        n = len(r["done_s"])
        # From the first arrival at share 0 (a log axis has no 0).
        dat = ["t share"] + ([f"{done[0]} 0"] if done else []) + [f"{t} {(i + 1) / n}" for i, t in enumerate(done)]
        write(out, f"content-{r['policy']}.dat", "\n".join(dat) + "\n")
    write(out, "content-setup.tex",
          f"{fmt(mib(d['file_bytes']))}~MiB file, {fmt(d['devices'])} devices in LAN groups of {fmt(d['lan_group'])} "
          f"({fmt(d['pairs_direct'])} device pairs punch a direct path, {fmt(d['pairs_relayed'])} need the relay)")


def main():
    results, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    for step in (gossip, clock_skew, symmetric_nat, content, swarm, model, sync, perf, merge):
        step(results, out)


if __name__ == "__main__":
    main()
