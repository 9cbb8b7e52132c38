"""``cen i2i predict``: translate one's own views with a trained CEN U-Net.

A checkpoint (a cenfusion translation one, or a released ``checkpoint-gen-N.pkl``, told
apart automatically) and one image per input domain for each sample; folders are paired by
file stem, a Taskonomy file's ``_domain_<domain>`` ending left out, so that the domain
folders of a Taskonomy root pair up. Writes, per sample::

    OUT/<stem>.png                 the ensemble's translation
    OUT/<stem>_from_<domain>.png   each branch's (with ``heads=True``)

Each view is decoded as in validation: the domain's own encoding to 8 bits
(:func:`~cenfusion.data.taskonomy.decode_domain_8bit`), PIL's bilinear resize to the side
the network sees, then ``[-1, 1]``. Outputs are 8-bit RGB at that size, written as
evaluation writes its ``fake*/`` images. The generator samples with its dropout active when
its run evaluated so (the released way); ``seed`` then fixes the samples.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from cenfusion.data.check import MAX_PROBLEMS, raise_problems
from cenfusion.data.own_images import (
    Sample,
    check_output_folder,
    check_output_names,
    check_outputs_spare_inputs,
    collect_samples,
)
from cenfusion.data.read_ahead import read_ahead
from cenfusion.data.taskonomy import (
    FILE_DOMAIN,
    read_domain_8bit,
    resize_8bit,
    resolve_domain,
    to_tensor,
)
from cenfusion.engine.run import RuntimeConfig
from cenfusion.engine.runtime import open_runtime
from cenfusion.errors import CenError
from cenfusion.fusion import stack_modalities
from cenfusion.translation.evaluate import save_images, use_dropout
from cenfusion.translation.modelio import LoadedGenerator, load_generator

__all__ = ["translate"]

#: Settings of a run that asks for none: the best device, float32, NCHW, eager.
DEFAULT_RUNTIME = RuntimeConfig()


def _domains(loaded: LoadedGenerator, given: Sequence[str] | None, where: str) -> list[str]:
    """The input domains in the order given, checked against the generator's branches."""
    count = loaded.model.num_modalities
    if given is None:
        if loaded.inputs is None:
            raise CenError(
                f"{where} does not name its input domains: give each input as "
                "--input DOMAIN=PATH, in the order of its branches"
            )
        return list(loaded.inputs)
    domains = [resolve_domain(d) for d in given]
    if len(set(domains)) != len(domains):
        raise CenError(f"input domains {', '.join(domains)}: expected distinct domains")
    trained = f" ({', '.join(loaded.inputs)})" if loaded.inputs else ""
    if len(domains) != count:
        raise CenError(
            f"{where}: the generator takes {count} inputs{trained}, {len(domains)} given "
            f"({', '.join(domains)})"
        )
    if loaded.inputs is not None and sorted(domains) != sorted(loaded.inputs):
        raise CenError(
            f"input domains {', '.join(domains)}: {where} was trained on{trained}; each "
            "branch learnt its own domain"
        )
    return domains


def _network_size(
    size: Sequence[int] | None, loaded: LoadedGenerator, where: str
) -> tuple[int, int]:
    """``(H, W)`` the network sees: ``size`` (one side or two), else the run's side."""
    step = 2**loaded.model.config.num_downs
    if size is None:
        if loaded.side % step:
            raise CenError(
                f"{where}: the default side {loaded.side} is not a multiple of 2**num_downs = "
                f"{step}; give --size"
            )
        return loaded.side, loaded.side
    if len(size) not in (1, 2) or min(size) < 1 or any(s % step for s in size):
        raise CenError(
            f"--size {' '.join(map(str, size))}: expected H W, multiples of 2**num_downs = {step}"
        )
    return (size[0], size[-1])


def load_views(paths: Sequence[Path], domains: Sequence[str], size: tuple[int, int]) -> Tensor:
    """One sample's views ``(M, 3, H, W)`` in ``[-1, 1]``, decoded as in validation."""
    images = [read_domain_8bit(p, d) for p, d in zip(paths, domains)]
    return torch.stack([to_tensor(resize_8bit(im, size)) for im in images])


def translate(
    checkpoint: str | Path,
    inputs: Sequence[str | Path | Sequence[str | Path]],
    out: str | Path,
    domains: Sequence[str] | None = None,
    size: Sequence[int] | None = None,
    heads: bool = False,
    dropout: bool | None = None,
    seed: int = 0,
    batch_size: int = 1,
    progress: bool = True,
    runtime: RuntimeConfig = DEFAULT_RUNTIME,
) -> list[Path]:
    """Translate every sample of ``inputs`` with the generator in ``checkpoint``; returns the
    files written under ``out`` (see the module docstring for their names).

    Args:
        inputs: items of :func:`~cenfusion.data.own_images.collect_samples`: one file or
            folder per input domain, or folders with one subfolder per domain.
        domains: the domains (names or ``--img-types`` indices) of the paths in each item.
            Default: the checkpoint's; given in another order, the inputs are reordered to
            its branches. A released file names none: give them in its branches' order.
        size: ``(H, W)`` or ``(S,)`` the network sees (multiples of ``2**num_downs``).
            Default: the side its run validated at (256 for a released file).
        heads: also write each branch's translation.
        dropout: sample with the generator's dropout active (default: as its run evaluated).
        seed: the dropout's random seed. The samples depend on it and on every view
            of the run, their order, ``batch_size`` and compilation: the same call gives
            the same samples.
        batch_size: views per forward pass; without dropout, the outputs are those of one
            at a time.
        runtime: device, precision, layout, compile, threads and memory.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    runtime.validate()
    if batch_size < 1:
        raise CenError(f"--batch-size {batch_size}: expected >= 1")
    if not 0 <= seed < 2**32:
        raise CenError(f"--seed {seed}: expected 0 to {2**32 - 1}")
    check_output_folder(out)
    loaded = load_generator(checkpoint)
    given = _domains(loaded, domains, str(checkpoint))
    shape = _network_size(size, loaded, str(checkpoint))
    endings = [f"_domain_{FILE_DOMAIN.get(d, d)}" for d in given]
    samples = collect_samples(inputs, given, endings)
    order = [given.index(d) for d in (loaded.inputs or given)]
    check_output_names(samples, [f"from_{d}" for d in given] if heads else [], files="{}.png")
    trained = [given[i] for i in order]
    problems = []
    for sample in samples:
        for path, domain in zip(sample.paths, given):
            try:
                read_domain_8bit(path, domain)
            except CenError as err:
                problems.append(str(err))
    raise_problems(problems, MAX_PROBLEMS, None)
    dropout = loaded.dropout if dropout is None else dropout
    names = [*(f"from_{d}" for d in trained), None] if heads else [None]
    planned = [out / f"{_file_stem(s.stem, name)}.png" for s in samples for name in names]
    check_outputs_spare_inputs(samples, planned)

    written: list[Path] = []
    model = loaded.model.eval()
    use_dropout(model, dropout)

    def load(sample: Sample) -> tuple[str, Tensor]:
        return sample.stem, load_views([sample.paths[i] for i in order], trained, shape)

    with open_runtime(runtime) as opened, _seeded(seed, opened.device):
        out.mkdir(parents=True, exist_ok=True)
        net = opened.prepare(model, frozen=not dropout)
        quiet = not progress or len(samples) < 2
        bar = tqdm(desc="translate", total=len(samples), unit="view", disable=quiet, delay=1)
        loads = iter(read_ahead(samples, load, ahead=2 * batch_size))
        while chunk := [item for _, item in zip(range(batch_size), loads)]:
            stems = [stem for stem, _ in chunk]
            views = torch.stack([v for _, v in chunk]).to(opened.device)
            with torch.inference_mode(), opened.precision.autocast():
                translated = net(stack_modalities(views))
            for name, images in zip(names, translated[-len(names) :]):
                files = [_file_stem(stem, name) for stem in stems]
                save_images(images, out, files)
                written += [out / f"{f}.png" for f in files]
            bar.update(len(chunk))
        bar.close()
    return written


def _file_stem(stem: str, head: str | None) -> str:
    """An output's name without ``.png``: the sample's stem, then its head (a branch)."""
    return stem if head is None else f"{stem}_{head}"


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """The random streams ``device``'s dropout draws from, seeded with ``seed`` and given
    back as they were: on the CPU its own alone (the caller's CUDA streams stay)."""
    cuda = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    with torch.random.fork_rng(cuda):
        if cuda:
            torch.manual_seed(seed)
        else:
            torch.default_generator.manual_seed(seed)
        yield
