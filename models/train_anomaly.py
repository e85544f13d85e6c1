#!/usr/bin/env python3
"""Train Sluice's reading anomaly model (`reading-iforest`) and export it to ONNX.

Deterministic: the same arguments give the same model.onnx and metadata.json. From the repo root:

    python models/train_anomaly.py                # writes models/reading-iforest/1/

Steps:
  1. Synthetic readings with the statistics of the simulator's fleet model
     (crates/simulator/src/fleet.rs: Device::new, Fleet::reading, new_episode,
     episode_start_probability, round), labelled with the injected anomaly episodes.
  2. Per-device rolling features exactly as processors/inferencer/src/features.rs ("v2"),
     the contract with processors/inferencer/src/features.rs: the same f64 operations in the
     same order, then cast to float32.
  3. An sklearn IsolationForest fitted on the training features (warm-up rows dropped); the
     label threshold on the score is the lowest whose precision on a separate validation set is
     at least --min-precision (0.9): the most anomalies found for few false alarms.
  4. A compact ONNX graph written by hand (one ai.onnx.ml TreeEnsembleRegressor node summing the
     per-tree path lengths, then Mul and Pow): score = 2^(-E[h(x)]/c(psi)), which equals
     sklearn's -score_samples(X). Checked against sklearn with onnxruntime, and timed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import numpy as np

# ---------------------------------------------------------------------------------------------
# Feature contract (spec: "Reading features v2")
# ---------------------------------------------------------------------------------------------

METRICS = ("temperature_c", "humidity_pct", "vibration_mm_s")
FEATURE_NAMES = [f"{m}.{f}" for m in METRICS for f in ("z", "dz", "repeats")]
FEATURE_PARAMS = {
    "alpha": 0.03,
    "warmup": 10,
    "gate_z": 3.0,
    "max_skips": 30,
    "repeat_cap": 20,
    "floor": {"temperature_c": 0.05, "humidity_pct": 0.2, "vibration_mm_s": 0.01},
}


class MetricState:
    """One (device, metric) baseline: the spec's observe(x), written out scalar by scalar.

    This is the reference implementation; `features_vectorized` must agree with it bit for bit.
    """

    __slots__ = ("n", "mean", "var", "last_ok", "last_raw", "repeats", "skips")

    def __init__(self):
        self.n = 0
        self.mean = 0.0
        self.var = 0.0
        self.last_ok = 0.0
        self.last_raw = 0.0
        self.repeats = 0
        self.skips = 0

    def observe(self, x, floor, p):
        if x is None or not math.isfinite(x):
            return (0.0, 0.0, 0.0)
        x = float(x)
        if self.n == 0:
            self.n = 1
            self.mean = x
            self.var = 0.0
            self.last_ok = x
            self.last_raw = x
            self.repeats = 0
            self.skips = 0
            return (0.0, 0.0, 0.0)
        step = x - self.last_raw
        self.repeats = self.repeats + 1 if x == self.last_raw else 0
        self.last_raw = x
        std = math.sqrt(self.var) + floor
        z = abs(x - self.mean) / std
        dz = abs(x - self.last_ok) / std
        rep = float(min(self.repeats, p["repeat_cap"]))
        warm = self.n >= p["warmup"]
        if (not warm) or z < p["gate_z"]:
            self.n = self.n + 1
            a = max(p["alpha"], 1.0 / self.n)
            d = x - self.mean
            self.mean = self.mean + a * d
            # The spread from successive differences: a drift moves the mean, not the spread.
            if self.n == 2:
                self.var = step * step / 2.0
            else:
                self.var = (1.0 - a) * self.var + a * (step * step / 2.0)
            self.last_ok = x
            self.skips = 0
        else:
            self.skips = self.skips + 1
            if self.skips >= p["max_skips"]:
                self.n = 1
                self.mean = x
                self.var = 0.0
                self.last_ok = x
                self.skips = 0
        if not warm:
            return (0.0, 0.0, 0.0)
        return (z, dz, rep)


def features_scalar(readings, p=FEATURE_PARAMS):
    """Feature rows (f64, [R, 9]) of one device's readings ([R, 3], None/NaN = missing)."""
    states = [MetricState() for _ in METRICS]
    floors = [p["floor"][m] for m in METRICS]
    rows = []
    for r in readings:
        row = []
        for i, st in enumerate(states):
            row.extend(st.observe(r[i], floors[i], p))
        rows.append(row)
    return np.array(rows, dtype=np.float64).reshape(len(rows), len(FEATURE_NAMES))


def features_vectorized(values, p=FEATURE_PARAMS):
    """Feature rows for many devices at once: values [D, R, 3] (NaN = missing) -> f64 [D, R, 9].

    Readings are processed in time order (axis 1), every (device, metric) pair independently,
    with element-wise IEEE f64 operations in the spec's order (numpy does not fuse mul-add), so
    the result equals `features_scalar` exactly; `check_features` asserts it.
    """
    D, R, M = values.shape
    floor = np.array([p["floor"][m] for m in METRICS], dtype=np.float64)[None, :]
    alpha, warmup, gate_z = p["alpha"], p["warmup"], p["gate_z"]
    max_skips, cap = p["max_skips"], p["repeat_cap"]
    n = np.zeros((D, M), dtype=np.int64)
    mean = np.zeros((D, M))
    var = np.zeros((D, M))
    last_ok = np.zeros((D, M))
    last_raw = np.zeros((D, M))
    repeats = np.zeros((D, M), dtype=np.int64)
    skips = np.zeros((D, M), dtype=np.int64)
    out = np.zeros((D, R, M, 3))
    with np.errstate(invalid="ignore"):
        for k in range(R):
            x = values[:, k, :]
            ok = np.isfinite(x)
            first = ok & (n == 0)
            rest = ok & (n > 0)
            # rest: repeats, last_raw, z, dz (evaluated from the state before this value)
            step = x - last_raw
            repeats = np.where(rest, np.where(x == last_raw, repeats + 1, 0), repeats)
            last_raw = np.where(rest, x, last_raw)
            std = np.sqrt(var) + floor
            z = np.abs(x - mean) / std
            dz = np.abs(x - last_ok) / std
            rep = np.minimum(repeats, cap).astype(np.float64)
            warm = n >= warmup
            upd = rest & (~warm | (z < gate_z))
            gated = rest & ~upd
            n_upd = n + 1
            a = np.maximum(alpha, 1.0 / n_upd)
            d = x - mean
            mean_upd = mean + a * d
            half = step * step / 2.0
            var_upd = np.where(n_upd == 2, half, (1.0 - a) * var + a * half)
            skips_g = skips + 1
            restart = gated & (skips_g >= max_skips)
            emit = rest & warm
            out[:, k, :, 0] = np.where(emit, z, 0.0)
            out[:, k, :, 1] = np.where(emit, dz, 0.0)
            out[:, k, :, 2] = np.where(emit, rep, 0.0)
            # state transitions: first value, baseline update, gated, restart
            n = np.where(first, 1, np.where(upd, n_upd, np.where(restart, 1, n)))
            mean = np.where(first | restart, x, np.where(upd, mean_upd, mean))
            var = np.where(first | restart, 0.0, np.where(upd, var_upd, var))
            last_ok = np.where(first | upd | restart, x, last_ok)
            skips = np.where(first | upd | restart, 0, np.where(gated, skips_g, skips))
            repeats = np.where(first, 0, repeats)
            last_raw = np.where(first, x, last_raw)
    return out.reshape(D, R, M * 3)


def check_features(values, feats, devices):
    """Asserts the vectorised features equal the scalar reference on `devices`, bit for bit."""
    for d in devices:
        ref = features_scalar([[None if not math.isfinite(v) else v for v in r] for r in values[d]])
        if not np.array_equal(ref.view(np.uint64), feats[d].view(np.uint64)):
            bad = np.argwhere(ref != feats[d])[0]
            raise SystemExit(f"feature implementations differ: device {d}, at {bad}")


# ---------------------------------------------------------------------------------------------
# Simulator port (crates/simulator/src/fleet.rs)
# ---------------------------------------------------------------------------------------------

SITE_UTC_OFFSETS = np.array([0.0, 1.0, -5.0, 8.0, 0.0, -8.0])  # SITES
EPISODE_LEN = (10, 30)  # inclusive, drift and stuck
MEAN_EPISODE_LEN = (1.0 + 20.0 + 20.0) / 3.0
SPIKE, DRIFT, STUCK = 0, 1, 2
KIND_NAMES = ("spike", "drift", "stuck")
# 2025-01-01T00:00:00Z; a data set starts at a seeded second of 2025.
EPOCH_2025 = 1735689600


def episode_start_probability(rate):
    if rate <= 0.0:
        return 0.0
    return min(max(rate / (MEAN_EPISODE_LEN * (1.0 - rate) + rate), 0.0), 1.0)


def rust_round(x, decimals):
    """fleet.rs `round`: (x * 10^d).round() / 10^d with Rust's round half away from zero."""
    scale = 10.0**decimals
    y = np.asarray(x, dtype=np.float64) * scale
    t = np.trunc(y)
    r = np.where(np.abs(y - t) >= 0.5, t + np.sign(y), t)  # y - trunc(y) is exact
    return r / scale


def rem_euclid(x, m):
    r = np.fmod(x, m)
    return np.where(r < 0.0, r + abs(m), r)


def make_devices(n, rng):
    """Device::new's per-device parameters (only those readings depend on)."""
    site = rng.integers(0, len(SITE_UTC_OFFSETS), n)
    temp_noise = rng.standard_normal(n)
    return {
        "utc_offset_h": SITE_UTC_OFFSETS[site],
        "temp_base": 21.0 + 3.0 * temp_noise,
        "temp_amp": rng.uniform(1.5, 5.0, n),
        "humid_base": rng.uniform(30.0, 70.0, n),
        "humid_amp": rng.uniform(3.0, 10.0, n),
        "vib_base": rng.uniform(0.8, 4.0, n),
    }


def new_episode(rng, humid_base, vib_base):
    """fleet.rs new_episode: (metric, kind, len, magnitude)."""
    metric = int(rng.integers(0, 3))
    kind = int(rng.integers(0, 3))
    length = 1 if kind == SPIKE else int(rng.integers(EPISODE_LEN[0], EPISODE_LEN[1] + 1))
    sign = 1.0 if rng.random() < 0.5 else -1.0
    if kind == STUCK:
        magnitude = 0.0
    elif metric == 0:
        magnitude = sign * (rng.uniform(12.0, 25.0) if kind == SPIKE else rng.uniform(6.0, 12.0))
    elif metric == 1:
        toward = -1.0 if humid_base > 50.0 else 1.0
        magnitude = toward * (rng.uniform(30.0, 45.0) if kind == SPIKE else rng.uniform(15.0, 30.0))
    else:
        magnitude = vib_base * (rng.uniform(4.0, 8.0) if kind == SPIKE else rng.uniform(2.0, 4.0))
    return metric, kind, length, magnitude


def simulate(devices, readings, seconds_per_reading, anomaly_rate, seed):
    """Readings of `devices` devices, `readings` each, reporting in turn.

    Returns values [D, R, 3] (payload values, rounded as sent), and the ground truth per reading:
    kind [D, R] (-1 normal, else SPIKE/DRIFT/STUCK) and metric [D, R] (-1 or the metric index).
    """
    rng = np.random.default_rng(seed)
    start = EPOCH_2025 + int(rng.integers(0, 365 * 86400))
    dev = make_devices(devices, rng)
    noise = rng.standard_normal((devices, readings, 3))
    roll = rng.random((devices, readings))
    # Device d's k-th report: devices take turns, so they are spread over each period; the
    # daily cycle uses whole seconds (chrono's timestamp()), as fleet.rs does.
    now = start + np.arange(readings)[None, :] * seconds_per_reading + (
        np.arange(devices)[:, None] * seconds_per_reading / devices
    )
    ts = np.floor(now)
    hour = rem_euclid(ts / 3600.0 + dev["utc_offset_h"][:, None], 24.0)
    day = np.sin(2.0 * math.pi * (hour - 9.0) / 24.0)
    activity = (day + 1.0) / 2.0
    col = lambda k: dev[k][:, None]  # noqa: E731
    temperature = col("temp_base") + col("temp_amp") * day + 0.3 * noise[..., 0]
    humidity = np.clip(col("humid_base") - col("humid_amp") * day + 1.0 * noise[..., 1], 0.0, 100.0)
    vibration = np.maximum(
        col("vib_base") * (0.6 + 0.8 * activity) + 0.1 * col("vib_base") * noise[..., 2], 0.0
    )
    signals = [temperature, humidity, vibration]
    kind = np.full((devices, readings), -1, dtype=np.int8)
    metric = np.full((devices, readings), -1, dtype=np.int8)
    p = episode_start_probability(anomaly_rate)
    for d in range(devices):
        free = 0  # first reading not inside an episode
        # A reading outside an episode starts one with probability p (gen_bool(p)).
        for k in np.flatnonzero(roll[d] < p):
            if k < free:
                continue
            m, kd, length, magnitude = new_episode(rng, dev["humid_base"][d], dev["vib_base"][d])
            for step in range(1, length + 1):
                i = k + step - 1
                if i >= readings:
                    break
                normal = signals[m][d, i]
                if kd == SPIKE:
                    value = normal + magnitude
                elif kd == DRIFT:
                    value = normal + magnitude * float(step) / float(length)
                else:
                    if step == 1:
                        magnitude = normal
                    value = magnitude
                if m == 1:
                    value = min(max(value, 0.0), 100.0)
                elif m == 2:
                    value = max(value, 0.0)
                signals[m][d, i] = value
                kind[d, i] = kd
                metric[d, i] = m
            free = k + length
    values = np.stack(
        [rust_round(signals[0], 2), rust_round(signals[1], 1), rust_round(signals[2], 3)], axis=-1
    )
    return {"values": values, "kind": kind, "metric": metric, "start": start}


def dataset(name, devices, readings, seconds_per_reading, anomaly_rate, seed, check_devices):
    t0 = time.perf_counter()
    sim = simulate(devices, readings, seconds_per_reading, anomaly_rate, seed)
    f64 = features_vectorized(sim["values"])
    check_features(sim["values"], f64, range(min(check_devices, devices)))
    # Time order across the fleet ([R, D] flattened), as a stream would deliver them.
    X = f64.astype(np.float32).transpose(1, 0, 2).reshape(-1, len(FEATURE_NAMES))
    kind = sim["kind"].T.reshape(-1)
    y = kind >= 0
    print(
        f"{name}: {devices} devices x {readings} readings (seed {seed}): {len(y)} rows, "
        f"{int(y.sum())} anomalous ({y.mean():.4f}; spike {int((kind == SPIKE).sum())}, "
        f"drift {int((kind == DRIFT).sum())}, stuck {int((kind == STUCK).sum())}) "
        f"[{time.perf_counter() - t0:.1f} s]"
    )
    return {**sim, "X": X, "y": y, "kind_flat": kind, "seed": seed, "devices": devices,
            "readings": readings}


# ---------------------------------------------------------------------------------------------
# Model, threshold, ONNX
# ---------------------------------------------------------------------------------------------


def best_f1_threshold(scores, y):
    """The threshold (label = score >= t) that maximises F1, as a midpoint between scores."""
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    tp = np.cumsum(y[order])
    k = np.arange(1, len(s) + 1)
    # Only cut where the next score differs (ties are labelled together).
    cut = np.r_[s[1:] != s[:-1], True]
    precision = tp / k
    recall = tp / max(int(y.sum()), 1)
    f1 = np.where(cut, 2 * precision * recall / np.maximum(precision + recall, 1e-12), -1.0)
    i = int(np.argmax(f1))
    lower = s[i + 1] if i + 1 < len(s) else s[i] - 1e-3
    return float((s[i] + lower) / 2.0)


def recall_at_precision_threshold(scores, y, min_precision):
    """The lowest threshold (label = score >= t) whose precision is still at least
    `min_precision`: the most anomalies found for at most 1 - min_precision false alarms."""
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    tp = np.cumsum(y[order])
    k = np.arange(1, len(s) + 1)
    cut = np.r_[s[1:] != s[:-1], True]
    ok = cut & (tp / k >= min_precision)
    if not ok.any():
        return best_f1_threshold(scores, y)
    i = int(np.nonzero(ok)[0].max())
    lower = s[i + 1] if i + 1 < len(s) else s[i] - 1e-3
    return float((s[i] + lower) / 2.0)


def evaluate(scores, y, threshold, kind=None):
    pred = scores >= threshold
    tp = int((pred & y).sum())
    fp = int((pred & ~y).sum())
    fn = int((~pred & y).sum())
    tn = int((~pred & ~y).sum())
    precision = tp / max(tp + fp, 1)
    recall = tp / max(tp + fn, 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    out = {
        "precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
        "rows": int(len(y)), "anomalous": int(y.sum()), "tp": tp, "fp": fp, "fn": fn, "tn": tn,
    }
    if kind is not None:
        out["recall_by_kind"] = {
            KIND_NAMES[k]: round(float(pred[kind == k].mean()), 4) for k in range(3)
        }
    return out


def f32_at_or_below(t):
    """The largest float32 <= t: for float32 x, x <= t  <=>  x <= f32_at_or_below(t)."""
    f = np.float32(t)
    if float(f) > t:
        f = np.nextafter(f, np.float32(-np.inf), dtype=np.float32)
    return float(f)


def build_onnx(forest, n_features, name):
    """The forest as one TreeEnsembleRegressor (SUM of per-tree path lengths / n_estimators) and
    score = 2 ** (mean_path * (-1 / c(max_samples)))."""
    import onnx
    from onnx import TensorProto, helper
    from sklearn.ensemble._iforest import _average_path_length

    n_est = len(forest.estimators_)
    subsample = forest._max_features != n_features  # as sklearn's score_samples decides
    a = {k: [] for k in ("nodes_treeids", "nodes_nodeids", "nodes_featureids", "nodes_values",
                         "nodes_modes", "nodes_truenodeids", "nodes_falsenodeids",
                         "target_treeids", "target_nodeids", "target_ids", "target_weights")}
    for t, (est, feats) in enumerate(zip(forest.estimators_, forest.estimators_features_)):
        tree = est.tree_
        depth = forest._decision_path_lengths[t]  # nodes on the path, root included
        avg = forest._average_path_length_per_tree[t]  # c(n_node_samples)
        for node in range(tree.node_count):
            left, right = int(tree.children_left[node]), int(tree.children_right[node])
            a["nodes_treeids"].append(t)
            a["nodes_nodeids"].append(node)
            if left == -1:  # leaf
                a["nodes_featureids"].append(0)
                a["nodes_values"].append(0.0)
                a["nodes_modes"].append("LEAF")
                a["nodes_truenodeids"].append(0)
                a["nodes_falsenodeids"].append(0)
                a["target_treeids"].append(t)
                a["target_nodeids"].append(node)
                a["target_ids"].append(0)
                # sklearn adds depth_path + c(n) - 1.0 per tree, then divides by n_estimators.
                a["target_weights"].append(float((depth[node] + avg[node] - 1.0) / n_est))
            else:
                f = int(tree.feature[node])
                if subsample:
                    f = int(feats[f])
                a["nodes_featureids"].append(f)
                # sklearn: float32 x promoted to double, x <= threshold (double).
                a["nodes_values"].append(f32_at_or_below(float(tree.threshold[node])))
                a["nodes_modes"].append("BRANCH_LEQ")
                a["nodes_truenodeids"].append(left)
                a["nodes_falsenodeids"].append(right)
    c_psi = float(_average_path_length([forest._max_samples])[0])
    trees = helper.make_node(
        "TreeEnsembleRegressor", ["features"], ["mean_path_length"], domain="ai.onnx.ml",
        name="iforest_path_length", n_targets=1, aggregate_function="SUM",
        post_transform="NONE", **a,
    )
    neg_inv_c = helper.make_tensor("neg_inv_c_psi", TensorProto.FLOAT, [], [-1.0 / c_psi])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    scale = helper.make_node("Mul", ["mean_path_length", "neg_inv_c_psi"], ["exponent"],
                             name="scale")
    power = helper.make_node("Pow", ["two", "exponent"], ["score"], name="score")
    graph = helper.make_graph(
        [trees, scale, power], name,
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", n_features])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N", 1])],
        initializer=[neg_inv_c, two],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid("ai.onnx.ml", ML_OPSET)],
        producer_name="sluice models/train_anomaly.py",
        ir_version=ONNX_IR_VERSION,
        doc_string="IsolationForest anomaly score of a sensor.reading feature row: "
                   "2^(-E[h(x)]/c(psi)) = sklearn -score_samples; higher = more anomalous.",
    )
    onnx.checker.check_model(model, full_check=True)
    return model, c_psi


ONNX_OPSET = 17
ML_OPSET = 3
ONNX_IR_VERSION = 8


def boundary_rows(forest, X, count, seed):
    """Rows that sit exactly on split thresholds (and one float32 step above), where a wrong
    threshold rounding or comparison would send them down the other branch."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        t = int(rng.integers(len(forest.estimators_)))
        tree, feats = forest.estimators_[t].tree_, forest.estimators_features_[t]
        splits = np.flatnonzero(tree.children_left != -1)
        node = int(rng.choice(splits))
        f = int(tree.feature[node])
        if forest._max_features != X.shape[1]:
            f = int(feats[f])
        at = np.float32(f32_at_or_below(float(tree.threshold[node])))
        for v in (at, np.nextafter(at, np.float32(np.inf), dtype=np.float32)):
            row = X[int(rng.integers(len(X)))].copy()
            row[f] = v
            rows.append(row)
    return np.array(rows, dtype=np.float32)


def verify_and_time(path, X, sk_scores, repeats):
    import onnxruntime as ort

    loads = []
    for _ in range(5):
        t0 = time.perf_counter()
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        loads.append(time.perf_counter() - t0)
    onnx_scores = np.concatenate(
        [sess.run(["score"], {"features": X[i:i + 65536]})[0] for i in range(0, len(X), 65536)]
    )
    if onnx_scores.shape != (len(X), 1):
        raise SystemExit(f"unexpected ONNX output shape {onnx_scores.shape}")
    diff = np.abs(onnx_scores[:, 0].astype(np.float64) - sk_scores)
    worst = float(diff.max())
    print(f"ONNX vs sklearn -score_samples on {len(X)} rows: max |diff| = {worst:.3g}")
    if not worst <= 1e-5:
        raise SystemExit(f"ONNX scores differ from sklearn by up to {worst} (> 1e-5)")
    # Timing: batch 1 and batch 1024, default session options.
    rng = np.random.default_rng(0)
    rows = X[rng.integers(0, len(X), repeats)]
    for i in range(50):
        sess.run(["score"], {"features": rows[i:i + 1]})
    t0 = time.perf_counter()
    for i in range(repeats):
        sess.run(["score"], {"features": rows[i:i + 1]})
    per_row_1 = (time.perf_counter() - t0) / repeats
    batch = X[:1024]
    for _ in range(5):
        sess.run(["score"], {"features": batch})
    n_batches = max(repeats // 20, 20)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        sess.run(["score"], {"features": batch})
    per_row_1024 = (time.perf_counter() - t0) / (n_batches * 1024)
    timing = {
        "load_ms": round(1e3 * float(np.median(loads)), 2),
        "batch_1_us_per_row": round(1e6 * per_row_1, 2),
        "batch_1024_us_per_row": round(1e6 * per_row_1024, 3),
        "cpu_threads": os.cpu_count(),
        "machine": platform.machine(),
    }
    print(
        f"onnxruntime {ort.__version__}: load {timing['load_ms']} ms (median of 5), "
        f"batch 1: {timing['batch_1_us_per_row']} us/row, "
        f"batch 1024: {timing['batch_1024_us_per_row']} us/row "
        f"({os.cpu_count()} CPU threads, default session options)"
    )
    return onnx_scores[:, 0], worst, timing


# ---------------------------------------------------------------------------------------------
# Reference data for the Rust side
# ---------------------------------------------------------------------------------------------


def f32_list(row):
    """float32 values written as the exact f64 of each (parses back to the same f32)."""
    return [float(np.float32(v)) for v in row]


def feature_reference(seed):
    """One device's readings, with a missing metric, a spike, stuck repeats and a level shift
    long enough to restart the baseline (max_skips), and their features."""
    sim = simulate(1, 70, 1.0, 0.0, seed)
    vals = sim["values"][0].tolist()  # [70, 3] floats
    readings = [list(r) for r in vals]
    readings[4][2] = None  # missing during warm-up
    readings[12][1] = None  # missing once warm
    readings[14][0] = round(readings[14][0] + 17.5, 2)  # temperature spike
    for i in range(18, 24):  # humidity stuck: 5 repeats of reading 18's value
        readings[i][1] = readings[18][1]
    for i in range(25, 70):  # vibration level shift x4: gated, then the baseline restarts
        readings[i][2] = round(readings[i][2] * 4.0, 3)
    feats = features_scalar(readings)
    vec = features_vectorized(
        np.array([[np.nan if v is None else v for v in r] for r in readings])[None, :, :]
    )[0]
    if not np.array_equal(feats, vec):
        raise SystemExit("feature reference: scalar and vectorised features differ")
    return {"readings": readings, "features": [f32_list(r) for r in feats]}


def score_reference(forest, val, sk_scores):
    """~8 validation rows: warm-up zeros, normal rows and one row of each anomaly kind."""
    X, kind = val["X"], val["kind_flat"]
    zero = np.flatnonzero(~X.any(axis=1))[:2]
    warm_normal = np.flatnonzero(X.any(axis=1) & (kind < 0))[:3]
    picks = list(zero) + list(warm_normal)
    for k in (SPIKE, DRIFT, STUCK):
        idx = np.flatnonzero((kind == k) & X.any(axis=1))
        # the row of that kind the model finds most anomalous
        picks.append(int(idx[np.argmax(sk_scores[idx])]))
    rows = X[picks]
    scores = -forest.score_samples(rows)
    return {"rows": [f32_list(r) for r in rows], "scores": [float(s) for s in scores]}


# ---------------------------------------------------------------------------------------------


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--out-dir", default=os.path.join(here, "reading-iforest", "1"),
                    help="folder for model.onnx and metadata.json")
    ap.add_argument("--devices", type=int, default=100, help="devices per data set")
    ap.add_argument("--train-readings", type=int, default=10000, help="readings per device, training")
    ap.add_argument("--val-readings", type=int, default=5000, help="readings per device, validation")
    ap.add_argument("--test-readings", type=int, default=5000,
                    help="readings per device, held-out test set (0 = none)")
    ap.add_argument("--seconds-per-reading", type=float, default=1.0,
                    help="seconds between a device's readings (simulator default: 100 devices at 100 events/s)")
    ap.add_argument("--anomaly-rate", type=float, default=0.01, help="share of anomalous readings")
    ap.add_argument("--train-seed", type=int, default=1)
    ap.add_argument("--val-seed", type=int, default=2)
    ap.add_argument("--test-seed", type=int, default=3)
    ap.add_argument("--model-seed", type=int, default=0, help="IsolationForest random_state")
    ap.add_argument("--reference-seed", type=int, default=7, help="seed of the feature_reference device")
    ap.add_argument("--min-precision", type=float, default=0.9,
                    help="the threshold is the lowest whose validation precision is at least this")
    ap.add_argument("--n-estimators", type=int, default=50)
    ap.add_argument("--max-samples", type=int, default=65536,
                    help="rows per tree (trees are ceil(log2(max_samples)) deep)")
    ap.add_argument("--max-features", type=float, default=1.0,
                    help="share of the 9 features each tree sees")
    ap.add_argument("--check-devices", type=int, default=3,
                    help="devices per data set whose features are recomputed by the scalar reference")
    ap.add_argument("--timing-repeats", type=int, default=2000, help="batch-1 runs timed")
    args = ap.parse_args(argv)

    import onnx
    import onnxruntime
    import sklearn
    from sklearn.ensemble import IsolationForest

    try:
        import skl2onnx
        skl2onnx_version = skl2onnx.__version__
    except ImportError:
        skl2onnx_version = None

    mk = lambda name, readings, seed: dataset(  # noqa: E731
        name, args.devices, readings, args.seconds_per_reading, args.anomaly_rate, seed,
        args.check_devices)
    train = mk("train", args.train_readings, args.train_seed)
    val = mk("validation", args.val_readings, args.val_seed)
    test = mk("test", args.test_readings, args.test_seed) if args.test_readings > 0 else None

    warm_rows = train["X"].any(axis=1)  # all-zero rows are warm-up
    X_fit = train["X"][warm_rows]
    forest = IsolationForest(
        n_estimators=args.n_estimators, max_samples=args.max_samples,
        max_features=args.max_features, random_state=args.model_seed,
    )
    t0 = time.perf_counter()
    forest.fit(X_fit)
    print(f"IsolationForest fitted on {len(X_fit)} rows ({int((~warm_rows).sum())} warm-up rows "
          f"dropped) in {time.perf_counter() - t0:.1f} s")

    sk_val = -forest.score_samples(val["X"])
    threshold = recall_at_precision_threshold(sk_val, val["y"], args.min_precision)
    val_eval = evaluate(sk_val, val["y"], threshold, val["kind_flat"])
    zero_score = float(-forest.score_samples(np.zeros((1, len(FEATURE_NAMES)), np.float32))[0])
    print(f"threshold {threshold:.6f} (most recall at precision >= {args.min_precision} on validation); all-zero row scores {zero_score:.4f}")
    print(f"validation: {json.dumps(val_eval)}")
    if zero_score >= threshold:
        raise SystemExit("an all-zero (warm-up) row would be labelled anomalous")
    test_eval = None
    if test is not None:
        sk_test = -forest.score_samples(test["X"])
        test_eval = evaluate(sk_test, test["y"], threshold, test["kind_flat"])
        print(f"test: {json.dumps(test_eval)}")

    os.makedirs(args.out_dir, exist_ok=True)
    model, c_psi = build_onnx(forest, len(FEATURE_NAMES), "reading-iforest")
    model_path = os.path.join(args.out_dir, "model.onnx")
    onnx.save(model, model_path)
    size = os.path.getsize(model_path)
    print(f"wrote {model_path}: {len(model.graph.node)} nodes, "
          f"{sum(len(e.tree_.feature) for e in forest.estimators_)} tree nodes, {size} bytes")

    edge = boundary_rows(forest, val["X"], 5000, args.model_seed)
    X_check = np.concatenate([val["X"], edge])
    sk_check = np.concatenate([sk_val, -forest.score_samples(edge)])
    print(f"checking ONNX on the validation set and {len(edge)} rows on split thresholds")
    onnx_check, worst, timing = verify_and_time(model_path, X_check, sk_check, args.timing_repeats)
    onnx_val = onnx_check[: len(val["X"])]
    onnx_eval = evaluate(onnx_val.astype(np.float64), val["y"], threshold)
    if (onnx_eval["tp"], onnx_eval["fp"]) != (val_eval["tp"], val_eval["fp"]):
        print(f"note: with ONNX float32 scores validation is {json.dumps(onnx_eval)}")

    meta = {
        "name": "reading-iforest",
        "version": "1",
        "event_type": "sensor.reading",
        "input": "features",
        "input_shape": ["N", len(FEATURE_NAMES)],
        "output": "score",
        "output_shape": ["N", 1],
        "features": FEATURE_NAMES,
        "feature_params": FEATURE_PARAMS,
        "feature_spec": "Reading features v2 (processors/inferencer/src/features.rs, docs/inference.md)",
        "threshold": threshold,
        "score": "2^(-E[h(x)]/c(psi)), sklearn -score_samples; label anomaly when score >= threshold",
        "sklearn_version": sklearn.__version__,
        "skl2onnx_version": skl2onnx_version,
        "onnx_version": onnx.__version__,
        "onnxruntime_version": onnxruntime.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "opsets": {"ai.onnx": ONNX_OPSET, "ai.onnx.ml": ML_OPSET},
        "onnx_ir_version": ONNX_IR_VERSION,
        "onnx_graph": "TreeEnsembleRegressor (ai.onnx.ml, SUM over trees of "
                      "(depth + c(n_leaf)) / n_estimators) -> Mul(-1/c(psi)) -> Pow(2, .)",
        "c_psi": c_psi,
        "training": {
            "data": "synthetic sensor.reading stream ported from crates/simulator/src/fleet.rs "
                    "(daily cycle by site UTC offset, noise, rounding, injected spike/drift/stuck "
                    "episodes); features per device in time order",
            "devices": args.devices,
            "readings_per_device": args.train_readings,
            "rows": int(len(train["y"])),
            "rows_fitted": int(len(X_fit)),
            "warmup_rows_dropped": int((~warm_rows).sum()),
            "anomalous_rows": int(train["y"].sum()),
            "seconds_per_reading": args.seconds_per_reading,
            "anomaly_rate": args.anomaly_rate,
            "episode_start_probability": episode_start_probability(args.anomaly_rate),
            "data_seed": args.train_seed,
            "start_unix_s": int(train["start"]),
            "model": "sklearn.ensemble.IsolationForest",
            "hyperparameters": {
                "n_estimators": args.n_estimators, "max_samples": args.max_samples,
                "max_features": args.max_features, "bootstrap": False,
                "random_state": args.model_seed,
            },
        },
        "validation": {
            "devices": args.devices, "readings_per_device": args.val_readings,
            "data_seed": args.val_seed, "start_unix_s": int(val["start"]),
            "anomaly_rate": args.anomaly_rate,
            "counting": "every reading of every injected episode is an anomaly; all readings "
                        "scored, warm-up included; the threshold is the lowest with precision >= "
                        f"{args.min_precision} here",
            **val_eval,
            "onnx_max_abs_diff_vs_sklearn": worst,
        },
        "test": None if test_eval is None else {
            "devices": args.devices, "readings_per_device": args.test_readings,
            "data_seed": args.test_seed, "start_unix_s": int(test["start"]), **test_eval,
        },
        "reference": score_reference(forest, val, sk_val),
        "feature_reference": feature_reference(args.reference_seed),
        "command": " ".join(["python models/train_anomaly.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    meta_path = os.path.join(args.out_dir, "metadata.json")
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    print(f"wrote {meta_path}")


if __name__ == "__main__":
    main()
