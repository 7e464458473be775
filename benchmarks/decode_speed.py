"""Decoding speed of a default-size decoder (random weights) on this machine's CPU.

Prints, for the raster order: plain greedy (our KV-cache loop), self-speculative greedy (NkTP heads draft,
one pass verifies), transformers `generate()` with a `LogitsProcessor` restricting the vocabulary to the
mask codes; and for the next-scale order the full coarse-to-fine pass. Greedy outputs are checked to be
identical between the three raster paths.

Random weights make the *acceptance rate* of speculative decoding meaningless for a trained model (zero-
initialised heads draft the next-token prediction again), so the script also prints an upper bound: drafts
that are always right (an oracle replaying the greedy result), which measures the cost of verification alone.

    python benchmarks/decode_speed.py [--threads 1 2] [--repeats 3] [--text-tokens 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from napari_mris.model.decoder import DecoderConfig, MRISDecoder, cache_keyword
from napari_mris.model.generate import autoregressive_infer
from napari_mris.model.orders import PlainCodes, decoding_order
from napari_mris.model.sequence import prefix_ids
from napari_mris.model.vocab import SOV, VocabLayout

LAYOUT = VocabLayout(n_text=1000, n_image=1000, n_mask={"raster": 1024, "scale": 1024})
IMAGE_GRID, MASK_GRID = 14, 14
SCALES = (1, 2, 3, 4, 6, 8, 10, 14)


def default_decoder(seed: int = 0) -> MRISDecoder:
    """`DecoderConfig`'s default size (6 layers, 256 wide, 16 NkTP heads) over `LAYOUT`, without dropout."""
    torch.manual_seed(seed)
    config = DecoderConfig(vocab_size=LAYOUT.vocab_size, dropout=0.0, n_scales=len(SCALES))
    return MRISDecoder(config).eval()


def make_prefix(text_tokens: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    image = torch.randint(0, LAYOUT.n_image, (IMAGE_GRID * IMAGE_GRID,), generator=generator)
    text = torch.randint(0, LAYOUT.n_text, (text_tokens,), generator=generator)
    return prefix_ids(LAYOUT, image, text, IMAGE_GRID)


def force_present(decoder: MRISDecoder, prefix: torch.Tensor) -> None:
    """Random weights may choose [REJ]; point the [SOV] row at the decision state so the mask is decoded."""
    with torch.no_grad():
        hidden = decoder(prefix[None]).hidden_states[0, -1]
        decoder.llama.lm_head.weight[SOV] = hidden * 10


def timed_decode(decoder, prefix, order, scales, **kwargs):
    start = time.perf_counter()
    first = None
    for step in autoregressive_infer(decoder, decoding_order(order, LAYOUT, PlainCodes(scales)), prefix, **kwargs):
        first = first if first is not None else time.perf_counter() - start
        last = step
    return time.perf_counter() - start, first, last


def timed_generate(decoder, prefix):
    """transformers generate() on the same Llama, greedy, restricted to the raster mask codes."""
    raster = decoding_order("raster", LAYOUT, PlainCodes((MASK_GRID,)))
    header = torch.tensor(raster.header())
    input_ids = torch.cat([prefix, header])[None]
    n = MASK_GRID * MASK_GRID
    start = time.perf_counter()
    out = decoder.llama.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        num_beams=1,
        logits_processor=[raster.legal_tokens()],
        eos_token_id=None,
        pad_token_id=0,
        use_cache=True,
    )
    elapsed = time.perf_counter() - start
    return elapsed, LAYOUT.mask_codes("raster", out[:, input_ids.shape[1] :])


def install_oracle(decoder: MRISDecoder, truth: torch.Tensor) -> None:
    """NkTP heads that always draft the greedy codes `truth` [1, N] (the best case of speculative decoding)."""
    state = {"done": 1, "drafts": None}
    k = truth.shape[-1]

    def oracle(hidden, offset, vocab_slice=None):
        if offset == 2 and state["drafts"] is not None:
            state["done"] += state["drafts"] + 1
        state["drafts"] = offset - 1
        index = min(state["done"] + offset - 2, k - 1)
        return F.one_hot(truth[:, index], vocab_slice.stop - vocab_slice.start).float()

    decoder.nktp_logits = oracle


def report(name: str, times: list[float], tokens: int, first: list[float | None]) -> None:
    best, median = min(times), statistics.median(times)
    line = f"  {name:<50} best {best * 1e3:6.0f} ms  median {median * 1e3:6.0f} ms  {tokens / median:5.0f} tok/s"
    if first[0] is not None:
        line += f"  first update (median) {statistics.median(first) * 1e3:4.0f} ms"
    print(line, flush=True)


def pass_cost(decoder: MRISDecoder, prefix: torch.Tensor, repeats: int = 20) -> None:
    """Median time of one cached forward pass: 1 token (ours vs the bare Llama) and 16 tokens (a verify pass)."""
    start = LAYOUT.mask_range("raster")[0]
    for name, width, bare in (
        ("1 token, MRISDecoder", 1, False),
        ("1 token, bare LlamaForCausalLM", 1, True),
        ("16 tokens, MRISDecoder", 16, False),
    ):
        cache = decoder(prefix[None], use_cache=True).past_key_values
        ids = torch.full((1, width), start)
        times = []
        for _ in range(repeats):
            begin = time.perf_counter()
            if bare:
                decoder.llama(input_ids=ids, use_cache=True, **{cache_keyword(type(decoder.llama.model)): cache})
            else:
                decoder(ids, past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - begin)
            cache.crop(-width)
        print(f"  cached forward pass, {name:<32} median {statistics.median(times) * 1e3:6.1f} ms", flush=True)


def count_passes(decoder: MRISDecoder) -> list[int]:
    calls = [0]
    original = decoder.forward

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    decoder.forward = counting
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--text-tokens", type=int, default=30, help="prompt length in text tokens")
    args = parser.parse_args()

    prefix = make_prefix(args.text_tokens)
    n_raster = MASK_GRID * MASK_GRID
    n_scale = sum(s * s for s in SCALES)
    decoder = default_decoder()
    force_present(decoder, prefix)
    params = sum(p.numel() for p in decoder.parameters())
    print(f"decoder: {params / 1e6:.1f} M parameters, vocab {LAYOUT.vocab_size}; prefix {prefix.numel()} tokens")
    print(f"raster: {n_raster} tokens (sequence {prefix.numel() + 5 + n_raster + 2}); next-scale: {n_scale} tokens")

    with torch.no_grad():
        passes = count_passes(decoder)
        list(
            autoregressive_infer(
                decoder, decoding_order("raster", LAYOUT, PlainCodes((MASK_GRID,))), prefix, speculative=True
            )
        )
        print(f"speculative with random heads: {passes[0] - 2} verify passes for {n_raster} tokens")
        del decoder.forward
        for threads in args.threads:
            torch.set_num_threads(threads)
            print(f"torch threads = {threads}", flush=True)
            pass_cost(decoder, prefix)
            times = {name: [] for name in MODES}
            firsts = {name: [] for name in MODES}
            greedy = None
            for _ in range(args.repeats):  # the modes interleaved, so a burst of load hits all of them alike
                for name in MODES:  # "plain" first: it gives the greedy codes the others must reproduce
                    elapsed, first, codes = run_mode(name, decoder, prefix, greedy)
                    times[name].append(elapsed)
                    firsts[name].append(first)
                    greedy = codes if name == "plain" else greedy
                    assert codes is None or torch.equal(codes, greedy), f"{name} output differs from greedy"
            for name, label in MODES.items():
                report(label, times[name], n_scale if name == "scale" else n_raster, firsts[name])
            for name in ("spec", "oracle", "generate"):
                ratios = [g / p for g, p in zip(times[name], times["plain"], strict=True)]
                print(f"  time {name} / time plain greedy: median {statistics.median(ratios):.2f}", flush=True)


MODES = {
    "plain": "raster greedy, our KV-cache loop",
    "spec": "raster greedy, self-speculative (random heads)",
    "oracle": "raster, speculative upper bound (all accepted)",
    "generate": "raster greedy, llama.generate() + LogitsProcessor",
    "scale": "next-scale, 8 scales",
}


def run_mode(name: str, decoder: MRISDecoder, prefix: torch.Tensor, greedy: torch.Tensor | None):
    """One timed decode; returns (seconds, seconds to the first update or None, raster codes or None)."""
    if name == "generate":
        elapsed, codes = timed_generate(decoder, prefix)
        return elapsed, None, codes
    if name == "scale":
        elapsed, first, _ = timed_decode(decoder, prefix, "scale", SCALES)
        return elapsed, first, None
    if name == "oracle":
        install_oracle(decoder, greedy)
    try:
        elapsed, first, last = timed_decode(decoder, prefix, "raster", (MASK_GRID,), speculative=name != "plain")
    finally:
        decoder.__dict__.pop("nktp_logits", None)
    return elapsed, first, last.codes


if __name__ == "__main__":
    main()
