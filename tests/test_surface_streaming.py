"""Streamers get the prompt, then each accepted token once, in order, as verification accepts them."""

from __future__ import annotations

from threading import Thread

import pytest
import torch
from transformers import TextIteratorStreamer, TextStreamer
from transformers.generation.streamers import BaseStreamer

import hf_sparsespec

from conftest import code_prompts

STRATEGIES = pytest.mark.parametrize("strategy", ["sparsespec", hf_sparsespec.generate], ids=["name", "callable"])
DRAFT_LEN = 4
NEW_TOKENS = 24


class RecordingStreamer(BaseStreamer):
    def __init__(self) -> None:
        self.puts: list[list[int]] = []
        self.ends = 0

    def put(self, value: torch.Tensor) -> None:
        assert self.ends == 0, "put after end"
        self.puts.append(value.view(-1).tolist())

    def end(self) -> None:
        self.ends += 1


@pytest.fixture(scope="module")
def inputs(bench_tokenizer):
    return bench_tokenizer(code_prompts(bench_tokenizer, num_tokens=40, count=1), return_tensors="pt")


def _new_text(tokenizer, sequences, inputs) -> str:
    return tokenizer.decode(sequences[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)


@STRATEGIES
def test_prompt_then_each_token_once_in_chunks(bench_model, inputs, strategy):
    streamer = RecordingStreamer()
    out = bench_model.generate(
        **inputs,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        custom_generate=strategy,
        draft_len=DRAFT_LEN,
        streamer=streamer,
        return_dict_in_generate=True,
    )
    prompt, *chunks = streamer.puts
    assert prompt == inputs.input_ids[0].tolist()
    assert [t for chunk in chunks for t in chunk] == out.sequences[0, len(prompt) :].tolist()
    assert streamer.ends == 1
    # Tokens arrive as each verification accepts them, not all at the end: at most k drafts plus one each time.
    assert max(len(chunk) for chunk in chunks) <= DRAFT_LEN + 1


@STRATEGIES
def test_text_streamer_prints_the_output(bench_model, bench_tokenizer, inputs, strategy, capsys):
    streamer = TextStreamer(bench_tokenizer, skip_prompt=True, skip_special_tokens=True)
    out = bench_model.generate(
        **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, custom_generate=strategy, streamer=streamer
    )
    printed = capsys.readouterr().out
    assert printed == _new_text(bench_tokenizer, out, inputs) + "\n"


@STRATEGIES
def test_iterator_streamer_yields_the_output(bench_model, bench_tokenizer, inputs, strategy):
    streamer = TextIteratorStreamer(bench_tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300)
    result = {}

    def run() -> None:
        result["out"] = bench_model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, custom_generate=strategy, streamer=streamer
        )

    worker = Thread(target=run)
    worker.start()
    pieces = list(streamer)
    worker.join()
    assert "".join(pieces) == _new_text(bench_tokenizer, result["out"], inputs)
    assert len(pieces) > 1


def test_streamed_text_equals_plain_greedy_streaming(bench_model, bench_tokenizer, inputs, capsys):
    printed = []
    for strategy in (None, "sparsespec"):
        bench_model.generate(
            **inputs,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            custom_generate=strategy,
            streamer=TextStreamer(bench_tokenizer, skip_prompt=True),
        )
        printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1]
    assert printed[0].strip()


def test_streaming_a_batch_is_refused(bench_model, bench_tokenizer):
    batch = bench_tokenizer(code_prompts(bench_tokenizer, num_tokens=16, count=2), return_tensors="pt", padding=True)
    with pytest.raises(ValueError, match="batch size 1"):
        bench_model.generate(**batch, max_new_tokens=4, custom_generate="sparsespec", streamer=RecordingStreamer())
