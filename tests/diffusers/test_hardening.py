"""Issue 9: what a hostile user tried, one test per finding (case numbers as in the issue).

ComfyUI-only findings (17: Apply ACT logs skipped parts) are in test_comfy_nodes.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import threading
import time

import numpy as np
import pytest
import torch
from helpers import Stack, random_map
from safetensors.torch import save_file

from act_core import ACTMap, ModuleMap
from act_core.cli import main
from act_core.errors import ACTError, ACTInputError, ACTMapFileError, ACTWarning
from act_core.files import atomic_write
from act_core.fitting import fit, fit_with_stats
from act_core.recording import select_modules

SOURCE = [f"a red circle number {i}" for i in range(8)]
TARGET = [f"a blue square, striped, number {i}" for i in range(8)]


@pytest.fixture(scope="module")
def pipe(tiny_pipe):
    yield tiny_pipe
    tiny_pipe.disable_act()


@pytest.fixture(scope="module")
def foldable(pipe):
    return pipe.fit_act(SOURCE, TARGET, preset="unet_norms_foldable", batch_size=4, progress=False)


def generate(pipe, guidance_scale=5.0, batch=1):
    generator = [torch.Generator().manual_seed(i) for i in range(batch)]
    return pipe(
        ["a red circle"] * batch,
        num_inference_steps=2,
        guidance_scale=guidance_scale,
        generator=generator,
        height=32,
        width=32,
        output_type="np",
    ).images


def weights(pipe):
    return {k: v.clone() for k, v in pipe.unet.state_dict().items()}


def same_weights(pipe, saved):
    return all(torch.equal(v, saved[k]) for k, v in pipe.unet.state_dict().items())


def stack_data():
    generator = torch.Generator().manual_seed(0)
    source = [torch.randn(8, 16, generator=generator) for _ in range(4)]
    target = [torch.randn(8, 16, generator=generator) * 2 + 1 for _ in range(4)]
    return source, target


# ------------------------------------------------------------------------------------------ 1, 18
def test_case01_interrupt_while_lockstep_threads_start_is_a_keyboard_interrupt(monkeypatch):
    import act_core.fitting as fitting

    started = []

    class InterruptedThread(threading.Thread):
        def start(self):
            if started:
                raise KeyboardInterrupt  # SIGINT lands while the second thread starts
            started.append(self)
            super().start()

    monkeypatch.setattr(fitting.threading, "Thread", InterruptedThread)
    model = Stack(depth=3)
    source, target = stack_data()
    modules = select_modules(model, ["*norm*"])
    with pytest.raises(KeyboardInterrupt):
        fit(model, source, target, modules, causal_strategy="lockstep")
    assert not any(m._forward_hooks for m in modules.values())


def test_case18_host_except_exception_progress_thread_wall_time_and_contextvars():
    import contextvars

    model = Stack(depth=3)
    source, target = stack_data()
    modules = select_modules(model, ["*norm*"])
    marker = contextvars.ContextVar("marker", default="unset")
    marker.set("caller")
    seen_in_workers, report_threads = set(), set()

    def careless_host(batch):  # a host that swallows every Exception around its model call
        seen_in_workers.add(marker.get())
        with contextlib.suppress(Exception):  # what careless hosts do
            model(batch)

    reference = fit(model, source, target, modules, causal_strategy="lockstep")
    start = time.perf_counter()
    act_map, stats = fit_with_stats(
        careless_host,
        source,
        target,
        modules,
        causal_strategy="lockstep",
        progress=lambda d, t, w: report_threads.add(threading.current_thread().name),
    )
    wall = time.perf_counter() - start
    assert act_map.equal(reference.with_metadata({})) or all(
        act_map.modules[n].equal(reference.modules[n]) for n in reference.modules
    )
    assert seen_in_workers == {"caller"} and report_threads == {threading.current_thread().name}
    assert 0 <= stats.forward_seconds <= wall and stats.strategy == "lockstep"
    # groupwise truncates passes with ACT's own exception: the careless host must not swallow it
    grouped, grouped_stats = fit_with_stats(
        careless_host, source, target, modules, causal_strategy="groupwise"
    )
    assert grouped_stats.strategy == "groupwise" and list(grouped.modules) == list(reference.modules)


# ------------------------------------------------------------------------------------------ 2, 3, 4, 9, 10
def test_case02_concurrent_fuse_calls_serialise_and_disable_restores_the_weights(pipe, foldable):
    saved = weights(pipe)
    errors = []

    def fuse(strength):
        try:
            for _ in range(5):
                pipe.fuse_act(foldable, strength)
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=fuse, args=(s,)) for s in (1.0, 0.5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert not same_weights(pipe, saved)  # one of the two is fused
    pipe.disable_act()
    assert same_weights(pipe, saved)


def test_case03_enable_fuse_disable_is_the_plain_pipeline_and_unfuse_adds_nothing(pipe, foldable):
    base = generate(pipe)
    pipe.enable_act(foldable)
    pipe.fuse_act()
    pipe.disable_act()
    assert np.array_equal(generate(pipe), base)
    pipe.unfuse_act()
    assert pipe.act_map is None and not any(m._forward_hooks for m in pipe.unet.modules())


def test_case04_fit_refuses_a_fused_or_enabled_pipeline(pipe, foldable):
    for steer in (lambda: pipe.fuse_act(foldable), lambda: pipe.enable_act(foldable)):
        steer()
        with pytest.raises(ACTInputError, match="disable_act"):
            pipe.fit_act(SOURCE, TARGET, preset="unet_norms_foldable", batch_size=4, progress=False)
        pipe.disable_act()


def test_case09_fuse_refuses_unknown_and_absent_parts(pipe, foldable):
    saved = weights(pipe)
    for strength in ({"bogus": 1}, {"text_encoder": 1}):
        with pytest.raises(ACTInputError, match="no part"):
            pipe.fuse_act(foldable, strength)
    assert same_weights(pipe, saved) and pipe.act_map is None


def test_case10_a_bad_strength_entry_changes_nothing(pipe, foldable):
    text = pipe.fit_act(SOURCE, TARGET, preset="text_encoder_norms", progress=False)
    both = ACTMap({**foldable.modules, **text.modules}, foldable.metadata)
    handle = pipe.enable_act(both, strength=0.3)
    try:
        with pytest.raises(ACTInputError, match="finite"):
            pipe.set_act_strength({"unet": 2.0, "text_encoder": float("nan")})
        with pytest.raises(ACTInputError, match="no part"):
            pipe.set_act_strength({"unet": 2.0, "vae": 1.0})
        assert {part: c.strength for part, c in handle.controls.items()} == dict.fromkeys(both.parts(), 0.3)
    finally:
        pipe.disable_act()


# ------------------------------------------------------------------------------------------ 5, 6
def test_case05_concurrent_generations_through_shared_modules_keep_their_own_rows(pipe, foldable):
    from act_core.diffusers import act_pipeline

    timed = pipe.fit_act(SOURCE, TARGET, num_inference_steps=2, height=32, width=32, progress=False)
    # A second pipeline on the same models; act_pipeline gives it its own scheduler and tokenizers.
    other = act_pipeline(type(pipe).__mro__[2].from_pipe(pipe, dtype=pipe.dtype))
    assert (
        other.unet is pipe.unet
        and other.scheduler is not pipe.scheduler
        and other.tokenizer is not pipe.tokenizer
    )
    pipe.enable_act(timed, strength=1.0)
    try:
        alone = {"cfg": generate(pipe, 5.0, batch=2), "plain": generate(other, 1.0, batch=1)}
        results, errors = {}, []

        def run(name, target, guidance, batch):
            try:
                for _ in range(3):
                    results[name] = generate(target, guidance, batch=batch)
            except BaseException as error:  # noqa: BLE001
                errors.append(error)

        threads = [
            threading.Thread(target=run, args=("cfg", pipe, 5.0, 2)),
            threading.Thread(target=run, args=("plain", other, 1.0, 1)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        pipe.disable_act()
    assert errors == []
    np.testing.assert_allclose(results["cfg"], alone["cfg"], atol=1e-5)
    np.testing.assert_allclose(results["plain"], alone["plain"], atol=1e-5)


def test_case05b_a_concurrent_call_on_the_same_pipeline_is_refused_with_the_fix(pipe):
    started, release, out = threading.Event(), threading.Event(), {}

    def slow_step(pipeline, step, t, kwargs):
        started.set()
        release.wait(timeout=30)
        return kwargs

    def first():
        out["images"] = pipe(
            "a red circle",
            num_inference_steps=2,
            height=32,
            width=32,
            output_type="np",
            callback_on_step_end=slow_step,
        ).images

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert started.wait(timeout=30)
        with pytest.raises(ACTError, match="own pipeline: act_pipeline"):
            generate(pipe)
    finally:
        release.set()
        thread.join()
    assert out["images"].shape == (1, 32, 32, 3)
    generate(pipe)  # free again once the first call has finished


def test_case06_a_second_concurrent_fit_is_refused_and_the_first_is_unharmed(pipe):
    options = {"preset": "unet_norms_first_step", "batch_size": 4}
    solo = pipe.fit_act(SOURCE, TARGET, progress=False, **options)
    started, release, out = threading.Event(), threading.Event(), {}

    def slow_progress(done, total, what):
        started.set()
        release.wait(timeout=30)

    def first():
        out["map"] = pipe.fit_act(SOURCE, TARGET, progress=slow_progress, **options)

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert started.wait(timeout=30)
        with pytest.raises(ACTError, match="Another fit_act is running"):
            pipe.fit_act(SOURCE, TARGET, preset="text_encoder_norms", progress=False)
    finally:
        release.set()
        thread.join()
    assert all(out["map"].modules[n].equal(m) for n, m in solo.modules.items())


# ------------------------------------------------------------------------------------------ 7, 15 (CLI)
def _no_model_load(monkeypatch):
    import act_core.diffusers.loading as loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(loading, "load_pipeline", refuse)


def test_case07_cli_output_in_an_unwritable_folder_exits_2_before_loading(tmp_path, monkeypatch, capsys):
    _no_model_load(monkeypatch)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode)
    )
    base = ["--model", str(tmp_path), "--output"]
    for argv in (
        ["fit", "--source", str(prompts), "--target", str(prompts), *base, str(locked / "m.safetensors")],
        ["sweep", "--map", str(prompts), "--prompt", "a cat", *base, str(locked / "g.png")],
        ["export-lora", "--map", str(prompts), *base, str(locked / "l.safetensors")],
    ):
        assert main(argv) == 2
        assert "not writable" in capsys.readouterr().err


def test_case15_cli_upper_case_suffix_is_refused_before_fitting(tmp_path, monkeypatch, capsys):
    _no_model_load(monkeypatch)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")
    argv = ["fit", "--model", str(tmp_path), "--source", str(prompts), "--target", str(prompts)]
    assert main([*argv, "--output", str(tmp_path / "m.SAFETENSORS")]) == 2
    assert "lower case: m.safetensors" in capsys.readouterr().err


def test_case12_huge_lambdas_are_refused(tmp_path, monkeypatch, capsys):
    from act_core.applying import check_strength

    with pytest.raises(ACTInputError, match="outside"):
        check_strength(1e38)
    _no_model_load(monkeypatch)
    path = random_map({"unet.a": 4}).save(tmp_path / "m.safetensors")
    argv = ["sweep", "--model", str(tmp_path), "--map", str(path), "--prompt", "a cat"]
    assert main([*argv, "--lambdas", "0,1e38", "--output", str(tmp_path / "g.png")]) == 2
    assert "outside" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()


# ------------------------------------------------------------------------------------------ 8
def test_case08_saved_files_have_normal_modes_follow_symlinks_and_clean_crash_leftovers(tmp_path):
    act_map = random_map({"n": 4})
    old_umask = os.umask(0o022)
    try:
        fresh = act_map.save(tmp_path / "fresh.safetensors")
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o644
        kept = tmp_path / "kept.safetensors"
        kept.write_bytes(b"old")
        os.chmod(kept, 0o640)
        act_map.save(kept)
        assert stat.S_IMODE(kept.stat().st_mode) == 0o640 and ACTMap.load(kept).equal(act_map)
    finally:
        os.umask(old_umask)
    real = tmp_path / "real.safetensors"
    act_map.save(real)
    link = tmp_path / "link.safetensors"
    link.symlink_to(real)
    other = random_map({"n": 4}, seed=5)
    other.save(link)
    assert link.is_symlink() and ACTMap.load(real).equal(other)
    dead = tmp_path / ".x.safetensors.999999999.abc.tmp"  # a crashed writer's leftover (no such pid)
    live = tmp_path / f".x.safetensors.{os.getpid()}.def.tmp"  # a concurrent writer's file: kept
    dead.write_bytes(b"partial")
    live.write_bytes(b"partial")
    act_map.save(tmp_path / "x.safetensors")
    assert not dead.exists() and live.exists()

    def crash(tmp):
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "x.safetensors", crash)
    assert ACTMap.load(tmp_path / "x.safetensors").equal(act_map)


# ------------------------------------------------------------------------------------------ 11, 15 (files)
def _write(path, tensors, modules, metadata="{}", version="2", buckets="null"):
    header = {
        "format": "act_map",
        "format_version": version,
        "modules": json.dumps(modules),
        "metadata": metadata,
        "buckets": buckets,
    }
    save_file(tensors, str(path), metadata=header)
    return path


def _tensors(name="n", width=3, **override):
    base = {
        "omega": torch.ones(width),
        "beta": torch.zeros(width),
        "low": -torch.ones(width),
        "high": torch.ones(width),
    }
    base.update(override)
    return {f"{name}.{k}": v.clone() for k, v in base.items()}


ENTRY = [{"name": "n", "width": 3, "apply_mode": "per_element"}]


@pytest.mark.parametrize(
    "tensors, modules, message",
    [
        (_tensors(omega=torch.ones(3, dtype=torch.int64)), ENTRY, "not a floating-point type"),
        (_tensors(omega=torch.ones(3, dtype=torch.uint8)), ENTRY, "not a floating-point type"),
        (_tensors(omega=torch.ones(3, dtype=torch.bool)), ENTRY, "not a floating-point type"),
        (_tensors(low=torch.tensor([0.0, float("nan"), 0.0])), ENTRY, "NaN"),
        (_tensors(low=torch.ones(3), high=-torch.ones(3)), ENTRY, "swapped"),
        (_tensors(omega=torch.full((3,), 3e38)), ENTRY, "implausibly large"),
        ({**_tensors(), **_tensors("m")}, ENTRY, "1 modules but the file holds 4 more tensor"),
        ({**_tensors()}, ENTRY * 2, "more than once"),
        ({**_tensors()}, [], "lists no modules"),
    ],
)
def test_case11_broken_map_files_are_refused(tmp_path, tensors, modules, message):
    path = _write(tmp_path / "broken.safetensors", tensors, modules)
    with pytest.raises(ACTMapFileError, match=message) as info:
        ACTMap.load(path)
    assert "broken.safetensors" in str(info.value)


def test_case15_map_metadata_must_be_an_object_and_errors_name_the_file(tmp_path):
    path = _write(tmp_path / "listmeta.safetensors", _tensors(), ENTRY, metadata="[1, 2]")
    with pytest.raises(ACTMapFileError, match="listmeta.safetensors.*JSON object"):
        ACTMap.load(path)


# ------------------------------------------------------------------------------------------ 13, 14
def test_case13_identical_activations_warn_in_the_core():
    model = Stack(depth=2)
    source, _ = stack_data()
    with pytest.warns(ACTWarning, match="identical at every hooked module"):
        fit(model, source, [s.clone() for s in source], select_modules(model, ["*norm*"]))


@pytest.mark.parametrize(
    "bad, message",
    [
        ([None, "a cat"], "prompt 0 is NoneType"),
        (["a cat", 3], "prompt 1 is int"),
        ([b"a cat", "a dog"], "decode bytes first"),
        ("a cat", "not one str"),
    ],
)
def test_case14_non_string_prompts_are_named(pipe, bad, message):
    with pytest.raises(ACTInputError, match=message):
        pipe.fit_act(bad, TARGET, progress=False)


# ------------------------------------------------------------------------------------------ 16
def test_case16_lora_export_is_exact_by_default_and_fp16_overflow_names_the_fix(pipe, foldable, tmp_path):
    from safetensors import safe_open

    from act_core.lora import export_lora

    path = export_lora(foldable, pipe, tmp_path / "exact.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["dtype"] == "fp32"
        assert all(handle.get_tensor(k).dtype == torch.float32 for k in handle.keys())  # noqa: SIM118 - safe_open has no __iter__
    huge = ACTMap(
        {
            n: ModuleMap(m.omega * 0 + 9.9, m.beta * 0 + 9e5, m.low, m.high, m.apply_mode)
            for n, m in foldable.modules.items()
        },
        foldable.metadata,
    )
    with pytest.raises(ACTInputError, match="overflows.*dtype fp32 \\(the default\\)"):
        export_lora(huge, pipe, tmp_path / "half.safetensors", dtype="fp16")
    assert not (tmp_path / "half.safetensors").exists()


# ------------------------------------------------------------------------------------------ 19
def test_case19_partly_unloaded_weights_are_refused_with_or_without_accelerate(pipe, tmp_path, monkeypatch):
    import diffusers.utils

    from act_core.diffusers import loading

    shell = type("Shell", (), {})()
    encoder = torch.nn.Linear(2, 2)
    encoder.weight = torch.nn.Parameter(torch.empty(2, 2, device="meta"))
    shell.components = {"text_encoder_2": encoder}
    with pytest.raises(loading.ACTModelLoadError, match="did not fill 1 weights of text_encoder_2"):
        loading._check_all_weights_loaded(shell, tmp_path / "x.safetensors", tmp_path)
    monkeypatch.setattr(diffusers.utils, "is_accelerate_available", lambda: False)
    with pytest.raises(loading.ACTModelLoadError, match="needs the accelerate package"):
        loading.require_accelerate(tmp_path / "x.safetensors")


# ------------------------------------------------------------------------------------------ 20, 21
def test_case20_unknown_words_are_named(pipe, capsys):
    with pytest.warns(ACTWarning, match="does not know.*zebra"):
        pipe.fit_act(
            ["a red circle", "a zebra"],
            ["a blue circle", "a blue zebra"],
            preset="text_encoder_norms",
            progress=False,
        )


def test_case21_small_models_run_on_one_thread_and_progress_is_plain_when_redirected(pipe, capsys):
    import io

    from act_core.cli import choose_threads
    from act_core.progress import Progress

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert choose_threads(pipe, None) == 1 and torch.get_num_threads() == 1
        assert choose_threads(pipe, 2) == 2
    finally:
        torch.set_num_threads(before)
    stream = io.StringIO()
    report = Progress("fit", stream=stream, interval=0.0)
    for done in range(1, 6):
        report(done, 5, "step")
    text = stream.getvalue()
    assert "\r" not in text and text.count("\n") == 5 and "fit: 5/5" in text
