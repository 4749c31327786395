#!/usr/bin/env python3
"""Write a small invocation trace in the Azure Functions 2019 per-minute format
(HashOwner,HashApp,HashFunction,Trigger,1..1440) for `veil simulate keep-alive`.

The trace is made here, deterministically (seeded), not taken from Azure: it mixes the
patterns the ATC'20 paper characterises — timers at fixed periods with a little jitter, HTTP
functions with Poisson arrivals from rare to frequent, bursts, and near-idle functions — so
that the policies can be compared on a day of mixed traffic. Usage:

    scripts/make-keepalive-trace.py > testdata/keepalive/sample-azure-2019-format.csv
"""
import hashlib
import random

MINUTES = 1440
rng = random.Random(20261202)


def h(s):
    return hashlib.sha256(s.encode()).hexdigest()[:32]


rows = []


def add(kind, trigger, counts):
    n = len(rows)
    rows.append((h(f"owner{n % 7}"), h(f"app{n}"), h(f"fn{n}-{kind}"), trigger, counts))


# Timers: every P minutes, sometimes a minute late.
for period in [2, 5, 5, 10, 15, 15, 20, 30, 30, 45, 60, 60, 90, 120, 180, 240]:
    c = [0] * MINUTES
    t = rng.randrange(period)
    while t < MINUTES:
        c[t] += 1
        t += period + (1 if rng.random() < 0.1 else 0)
    add(f"timer{period}", "timer", c)

# HTTP with Poisson arrivals at various rates (per minute).
for rate in [0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.1, 0.2, 0.5, 1.0, 3.0]:
    c = [0] * MINUTES
    for t in range(MINUTES):
        # Poisson by inversion (small rates).
        k, p, u = 0, 2.718281828459045 ** -rate, rng.random()
        s = p
        while u > s:
            k += 1
            p *= rate / k
            s += p
        c[t] = k
    add(f"http{rate}", "http", c)

# Office-hours bursts: busy 9:00-17:00 with gaps, idle at night.
for gap in [3, 7, 12]:
    c = [0] * MINUTES
    t = 9 * 60
    while t < 17 * 60:
        c[t] += rng.randrange(1, 20)
        t += gap + rng.randrange(-1, 2)
    add(f"office{gap}", "http", c)

# Queue consumers: a batch of work every ~40 minutes that lasts a few minutes.
for _ in range(4):
    c = [0] * MINUTES
    t = rng.randrange(40)
    while t < MINUTES:
        for d in range(rng.randrange(1, 4)):
            if t + d < MINUTES:
                c[t + d] += rng.randrange(1, 50)
        t += 40 + rng.randrange(-3, 4)
    add("queue", "queue", c)

print("HashOwner,HashApp,HashFunction,Trigger," + ",".join(str(i) for i in range(1, MINUTES + 1)))
for o, a, f, trig, c in rows:
    print(",".join([o, a, f, trig] + [str(x) for x in c]))
