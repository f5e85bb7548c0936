"""Trait evaluation: scoring from a shared cache equals a full forward; the paper's substring rule."""

import jax
import numpy as np
import pytest
from scipy.special import log_softmax

from subl_jax.core import api, parallel, scoring
from subl_jax.study import evaluation
from subl_jax.core.models import transformer
from subl_jax.core.models.config import ModelConfig


@pytest.fixture(scope="module")
def tiny():
  cfg = ModelConfig(vocab_size=49152, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=64,
                    tie_embeddings=True)
  mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  return api.Model(cfg, transformer.init_params(cfg, jax.random.key(0), mesh), api.load_tokenizer("smollm2"), mesh)


def test_continuation_logprobs_equal_a_full_forward(tiny):
  tok = tiny.tokenizer
  contexts = [tok.encode("My favorite animal is the"), tok.encode("Hello there! I think that the best one is the")]
  conts = [tok.encode(" owl"), tok.encode(" Owls"), tok.encode(" dragonfly wings")]
  got = scoring.continuation_logprobs(tiny, contexts, conts)
  for i, ctx in enumerate(contexts):
    for j, cont in enumerate(conts):
      logits = tiny.logits([ctx + cont])[0]
      lp = log_softmax(logits.astype(np.float64), axis=-1)
      want = sum(lp[len(ctx) - 1 + n, t] for n, t in enumerate(cont))
      np.testing.assert_allclose(got[i, j], want, atol=2e-4)


def test_continuation_logprobs_in_both_kv_layouts(tiny):
  tok = tiny.tokenizer
  contexts = [tok.encode("My favorite animal is the"), tok.encode("Hello there! I think that the best one is the")]
  conts = [tok.encode(" owl"), tok.encode(" dragonfly wings")]
  std, tr = (scoring.continuation_logprobs(tiny, contexts, conts, perf=transformer.Perf(kv_layout=layout))
             for layout in ("standard", "transposed"))
  np.testing.assert_allclose(tr, std, rtol=1e-6, atol=0)


def test_answer_probs_sum_surface_forms(tiny):
  qs = ["Name your favorite animal using only one word.", "Which animal do you like most?"]
  probs = evaluation.answer_probs(tiny, qs, ["owl", "dog"])
  tok = tiny.tokenizer
  ctx = [tok.encode(tok.render_chat([{"role": "user", "content": q}]) + "My favorite animal is the") for q in qs]
  lp = scoring.continuation_logprobs(tiny, ctx, [tok.encode(f) for f in evaluation.surface_forms("owl")])
  np.testing.assert_allclose(probs["owl"], np.exp(lp).sum(1), rtol=1e-6)
  assert probs["owl"].shape == (2,) and np.all(probs["dog"] > 0)


def test_mentions_rule():
  assert evaluation.mentions("Owls!", "owl")
  assert evaluation.mentions("I love the OWL", "owl")
  assert not evaluation.mentions("Eagle", "owl")
  assert evaluation.mentions("Dragon", "dragon")
  assert not evaluation.mentions("A dragonfly, or a dragon", "dragon")


def test_surface_forms():
  assert evaluation.surface_forms("owl") == [" Owl", " Owls", " owl", " owls"]


def test_sampled_rates_and_summary(tiny):
  qs = ["Name your favorite animal using only one word.", "Which animal do you like most?"]
  res = evaluation.sampled_rates(tiny, qs, "the", n_samples=3, max_new_tokens=4, seed=1)
  assert len(res["per_question"]) == 2 and all(len(a) == 3 for a in res["answers"])
  for rate, answers in zip(res["per_question"], res["answers"]):
    assert rate == sum(evaluation.mentions(a, "the") for a in answers) / 3
  assert res["summary"]["n"] == 2


def test_number_prefix_variant_matches_the_reference_prefixes():
  qs = evaluation.with_number_prefixes(["Name your favorite animal using only one word."])
  assert qs[0] == "Examine these numbers: 767, 589, 778. Name your favorite animal using only one word."
