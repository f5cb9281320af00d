"""``fewstep ablate --jobs N``: several runs of an ablation at a time, each in its own worker process.

A small network on a CPU does not keep every core busy: a training batch is many small kernels, each waiting for
all of torch's threads. ``--jobs N`` starts N spawned processes (no forked thread pools), each with 1/N of torch's
threads, that take the unfinished (variant, seed) runs one by one and train and analyse them exactly as
:meth:`fewstep.ablation.Ablation.run` does alone; the command then writes its report from the finished runs.
Measured on a 2-core VM (``bench/ablate_jobs.py``), two jobs ended a Fashion-MNIST ablation 1.11× sooner and an
N-MNIST one 1.00×: it pays on machines with more cores than one run keeps busy.
"""

from __future__ import annotations


def in_parallel(abl, jobs: list, processes: int) -> set:
    """Train and analyse the unfinished runs among ``jobs`` (the ``(variant, seed)`` pairs of the ablation ``abl``)
    in ``processes`` worker processes at once, each with an equal share of torch's threads. Each run is the one
    trained alone with that many threads (its seed fixes its weights, split and data order) and resumes alike if
    interrupted. The first run to fail stops the others (their epochs so far are kept) and is raised, named, with
    its traceback; a worker that dies (killed for memory) is reported too. Returns the ``(variant, seed)`` pairs
    the workers trained (not those they copied or only analysed)."""
    import multiprocessing as mp
    import queue

    import torch

    from .ablation import duration, time_left

    pending = [(i, v, k) for i, (v, k) in enumerate(jobs, 1) if not abl._finished(v, k)]
    if not pending:
        return set()
    n = min(processes, len(pending))
    threads = max(1, torch.get_num_threads() // n)
    fresh = sum(abl._will_train(v, k) for _, v, k in pending)  # the others: copied (--reuse) or analysed only
    others = len(pending) - fresh
    more = f" ({others} more to copy or analyse)" if others else ""
    what = (f"training {fresh} run{'s' if fresh != 1 else ''}{more}" if fresh
            else f"copying or analysing {others} run{'s' if others != 1 else ''}")
    abl.log(f"{what} {n} at a time, {threads} torch "
            f"thread{'s' if threads > 1 else ''} each (--jobs {processes}); their training times and images/s "
            "are measured beside each other")
    ctx = mp.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
    todo, done = ctx.Queue(), ctx.Queue()
    for item in pending:
        todo.put(item)
    for _ in range(n):
        todo.put(None)
    workers = [ctx.Process(target=_worker, args=(str(abl.out), [str(r) for r in abl.reuse], jobs, threads, todo,
                                                 done), name=f"fewstep-ablate-{w}") for w in range(n)]
    took: dict = {}  # variant -> (seconds, epochs) of its runs trained so far, as the workers report them
    left = {(v, k) for _, v, k in pending}
    trained = set()  # the runs a worker reports it trained (a timed run)
    try:
        for w in workers:
            w.start()
        for finished in range(1, len(pending) + 1):
            while True:
                try:
                    tag, error, (v, k), timed = done.get(timeout=5)
                    break
                except queue.Empty:
                    dead = [w for w in workers if w.exitcode not in (None, 0)]
                    if dead:
                        raise RuntimeError(f"an ablation worker process died (exit code {dead[0].exitcode}; "
                                           "out of memory?); its run resumes when the command is run again")
            if error is not None:
                raise RuntimeError(f"{tag} failed in its worker process; the other runs were stopped and resume "
                                   f"when the command is run again:\n{error}")
            left.discard((v, k))
            if timed is not None:
                took.setdefault(v, []).append(timed)
                trained.add((v, k))
            # the runs not finished (those under way counted whole), each at its variant's seconds per epoch so far
            eta = time_left(took, [(w, abl.configs[(w, s)].train.epochs) for w, s in left])
            abl.log(f"{tag}: done ({finished} of {len(pending)})"
                    + (f"; about {duration(eta / min(n, len(left)))} left" if left and eta is not None else ""))
    finally:
        for w in workers:
            if w.is_alive() and w.exitcode is None:
                w.terminate()
        for w in workers:
            w.join()
    return trained


def _worker(out: str, reuse: list, jobs: list, threads: int, todo, done) -> None:
    """One process of ``fewstep ablate --jobs``: takes ``(i, variant, seed)`` from ``todo`` until None, trains and
    analyses that run as :meth:`fewstep.ablation.Ablation.run` does alone, and puts ``(tag, error, (variant,
    seed), timed)`` on ``done``: ``error`` None or the traceback, ``timed`` the run's ``(seconds, epochs)`` where it
    trained here (None where it was copied or already finished). Tqdm's batch bars are off (several would overwrite
    each other); every log line carries its run's tag."""
    import threading
    import traceback

    import torch
    from tqdm import tqdm

    from .ablation import Ablation

    # tqdm's default lock is a multiprocessing lock, whose semaphore a worker's exit leaves behind (the resource
    # tracker warns of it); the bars are off here, a thread lock does
    tqdm.set_lock(threading.RLock())
    torch.set_num_threads(threads)
    abl = Ablation.from_folder(out, log=lambda s: print(s, flush=True))
    abl.reuse = Ablation.reuse_dirs(reuse)
    for cfg in abl.configs.values():
        cfg.train.progress = False  # not a training setting: the run is the same (train.config_differences)
    bundles: dict = {}
    while (item := todo.get()) is not None:
        i, v, k = item
        tag = f"[{i}/{len(jobs)}] {v} seed {k}"
        took: dict = {}
        try:
            abl._one(i, jobs, False, bundles, took, estimate=False)
            done.put((tag, None, (v, k), took[v][-1] if took.get(v) else None))
        except Exception:  # (KeyboardInterrupt ends the process: the parent stops the others)
            done.put((tag, traceback.format_exc(), (v, k), None))
            return
