"""The Encoder API: order, bucketing, prompts, pooling, truncation and input errors."""

import numpy as np
import pytest
from flax import nnx

from helpers import SENTENCES
from scalingnote_jax.encoder import Encoder
from scalingnote_jax.models.llm import LLMConfig
from scalingnote_jax.models.tokenizer import Tokenizer
from scalingnote_jax.models.tower import Tower, TowerConfig

pytestmark = pytest.mark.floor  # also run on the oldest supported stack (make test-floor)

WORDS = "retrieval dense sparse vector index query document tower scaling law token".split()


def texts(n, seed=0):
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 40)))) for _ in range(n)]


@pytest.fixture(scope="module")
def minilm(minilm_dir):
  return Encoder.from_pretrained(minilm_dir)


@pytest.fixture(scope="module")
def decoder(smollm2_gguf):
  """A small random decoder tower with SmolLM2's real GGUF tokenizer (last-token pooling + EOS)."""
  tok = Tokenizer.from_pretrained(smollm2_gguf)
  cfg = LLMConfig(vocab_size=49152, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                  intermediate_size=128, tie_word_embeddings=True, eos_token_id=tok.eos_id)
  tower_cfg = TowerConfig(pooling="last", append_eos=True, max_length=64, query_prompt="Query: {text}")
  return Encoder(Tower.create(cfg, tower_cfg, nnx.Rngs(0)), tok)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["minilm", "decoder"])
def test_batched_equals_one_by_one_in_callers_order(which, request):
  enc = request.getfixturevalue(which)
  xs = texts(23)
  batched = enc.encode(xs, batch_size=4)
  alone = np.concatenate([enc.encode([x]) for x in xs[:6]])
  np.testing.assert_allclose(batched[:6], alone, atol=2e-5)
  assert batched.shape == (23, enc.dim) and batched.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
  # a permutation of the input permutes the output the same way
  perm = np.random.default_rng(1).permutation(23)
  np.testing.assert_allclose(enc.encode([xs[i] for i in perm], batch_size=4), batched[perm], atol=2e-5)


def test_bucketing_compiles_a_handful_of_shapes(minilm):
  before = minilm._forward._cache_size()
  minilm.encode(texts(64, seed=3), batch_size=8)  # lengths 3..~45 tokens
  minilm.encode(texts(5, seed=4), batch_size=8)  # a small batch reuses a batch bucket
  compiled = minilm._forward._cache_size() - before
  assert 1 <= compiled <= 5, compiled


def test_last_token_pooling_reads_the_eos_state(decoder):
  x = "dense retrieval with towers"
  ids = decoder.tokenizer.encode([x], max_length=64, append_eos=True)[0]
  assert ids[-1] == decoder.tokenizer.eos_id
  hidden = np.asarray(decoder.tower.backbone(np.array([ids]), np.ones((1, len(ids)), np.int32)))[0, -1]
  np.testing.assert_allclose(decoder.encode([x])[0], hidden / np.linalg.norm(hidden), atol=1e-5)


def test_prompts_are_configuration(decoder, minilm):
  np.testing.assert_allclose(decoder.encode_queries(["what is a tower"]),
                             decoder.encode(["Query: what is a tower"]), atol=1e-6)
  docs = minilm.encode_documents([{"title": "Towers", "text": "A tower encodes text."}, "plain text",
                                  {"text": "no title"}])
  np.testing.assert_allclose(docs, minilm.encode(["Towers A tower encodes text.", "plain text", "no title"]),
                             atol=1e-6)
  with pytest.raises(ValueError, match=r"query_prompt.*no \{text\} slot"):
    TowerConfig(query_prompt="Query:")


def test_overlong_inputs_truncate_by_default_or_fail_clearly(minilm):
  long_a = " ".join(["retrieval"] * 600)
  long_b = long_a + " completely different ending words"
  a, b = minilm.encode([long_a, long_b])
  np.testing.assert_allclose(a, b, atol=1e-6)  # both cut at max_length (256) before they differ
  with pytest.raises(ValueError, match=r"input 1 has \d+ tokens, over max_length=256"):
    minilm.encode(["short", long_a], truncate=False)


def test_bad_inputs_fail_clearly(minilm):
  with pytest.raises(ValueError, match="empty list"):
    minilm.encode_queries([])
  with pytest.raises(TypeError, match=r"queries\[2\]: expected a string, got int"):
    minilm.encode_queries(["a", "b", 3])
  with pytest.raises(TypeError, match=r"queries: expected a list, got one str \(encode_query takes a single one"):
    minilm.encode_queries("a single string")
  with pytest.raises(TypeError, match=r"docs\[1\]: a document dict needs a string 'text'"):
    minilm.encode_documents(["ok", {"title": "no text"}])


def test_sentence_transformers_names_take_a_string_or_a_list(minilm):
  batch = minilm.encode_queries(SENTENCES[:2])
  np.testing.assert_array_equal(minilm.encode_query(SENTENCES[0]), batch[0])  # one string: one vector [D]
  np.testing.assert_array_equal(minilm.encode_query(SENTENCES[:2]), batch)
  docs = [{"title": "t", "text": SENTENCES[2]}, SENTENCES[3]]
  np.testing.assert_array_equal(minilm.encode_document(docs[0]), minilm.encode_documents(docs)[0])
  assert minilm.encode_document([]).shape == (0, minilm.dim)  # nothing in, nothing out



def test_normalize_embeddings_as_sentence_transformers_does(decoder):
  cfg = LLMConfig(vocab_size=49152, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                  intermediate_size=128, tie_word_embeddings=True, eos_token_id=decoder.tokenizer.eos_id)
  raw = Encoder(Tower.create(cfg, TowerConfig(pooling="mean", normalize=False, max_length=64), nnx.Rngs(0)),
                decoder.tokenizer)  # a tower that does not normalise
  plain = raw.encode_query(SENTENCES[:2], show_progress_bar=False)
  assert not np.allclose(np.linalg.norm(plain, axis=1), 1.0)
  unit = raw.encode_query(SENTENCES[:2], normalize_embeddings=True)
  np.testing.assert_allclose(unit, plain / np.linalg.norm(plain, axis=1, keepdims=True), rtol=1e-6)


def test_progress_bar_for_long_inputs(minilm, capsys):
  minilm.encode(SENTENCES * 3, batch_size=2, show_progress=True)
  assert "encoding" in capsys.readouterr().err


def st_folder(tmp_path, minilm_dir, modules, files=None, prompts=None):
  """all-MiniLM-L6-v2's files with another modules.json (and module files, prompts)."""
  import json
  import os

  out = tmp_path / "st"
  out.mkdir()
  for name in os.listdir(minilm_dir):
    if name not in ("modules.json", "config_sentence_transformers.json"):
      os.symlink(os.path.join(minilm_dir, name), out / name)
  kinds = {"T": ("", "Transformer"), "P": ("1_Pooling", "Pooling"), "D": ("2_Dense", "Dense"),
           "N": ("3_Normalize", "Normalize"), "L": ("2_LayerNorm", "LayerNorm")}
  (out / "modules.json").write_text(json.dumps([
      {"idx": i, "name": str(i), "path": kinds[k][0], "type": f"sentence_transformers.models.{kinds[k][1]}"}
      for i, k in enumerate(modules)]))
  (out / "config_sentence_transformers.json").write_text(json.dumps({"prompts": prompts or {}}))
  for name, write in (files or {}).items():
    (out / name).mkdir(parents=True, exist_ok=True)
    write(out / name)
  return str(out)


def test_a_sentence_transformers_folder_is_read_as_its_modules_say(tmp_path, minilm_dir, minilm):
  """modules.json drives the modules: a Dense module is applied with its weights (torch's [out, in]),
  Normalize only when listed, saved prompts are the tower's; a module it cannot compute is refused by name."""
  import json

  from safetensors.numpy import save_file

  rng = np.random.default_rng(0)
  w, b = rng.normal(0, 0.1, (16, 384)).astype(np.float32), rng.normal(0, 0.1, 16).astype(np.float32)

  def dense(d, activation="torch.nn.modules.linear.Identity"):
    (d / "config.json").write_text(json.dumps({"in_features": 384, "out_features": 16, "bias": True,
                                               "activation_function": activation}))
    save_file({"linear.weight": w, "linear.bias": b}, str(d / "model.safetensors"))

  folder = st_folder(tmp_path, minilm_dir, "TPDN", {"2_Dense": dense},
                     prompts={"query": "query: ", "passage": "passage {x}: "})
  enc = Encoder.from_pretrained(folder)
  pooled = Encoder.from_pretrained(minilm_dir, normalize=False).encode(SENTENCES)
  want = pooled @ w.T + b
  np.testing.assert_allclose(enc.encode(SENTENCES), want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-5)
  assert enc.cfg.query_prompt == "query: {text}" and enc.cfg.document_prompt == "passage {{x}}: {title} {text}"
  assert enc.document_texts([{"title": "t", "text": "d"}]) == ["passage {x}: t d"]  # (braces kept as text)
  np.testing.assert_array_equal(enc.encode_query(SENTENCES[:2]), enc.encode(["query: " + s for s in SENTENCES[:2]]))

  # without Normalize in modules.json the embeddings are not normalised
  import shutil
  shutil.rmtree(tmp_path / "st")
  np.testing.assert_allclose(Encoder.from_pretrained(st_folder(tmp_path, minilm_dir, "TP")).encode(SENTENCES),
                             pooled, atol=1e-6)

  for modules, files, error in (
      ("TPLN", {}, r"module '2' of type 'sentence_transformers.models.LayerNorm' is not supported"),
      ("TPDN", {"2_Dense": lambda d: dense(d, "torch.nn.modules.activation.Tanh")}, "only a linear Dense module"),
      ("TNP", {}, r"modules \['Transformer', 'Normalize', 'Pooling'\]: expected Transformer, then"),
  ):
    shutil.rmtree(tmp_path / "st")
    with pytest.raises(ValueError, match=error):
      Encoder.from_pretrained(st_folder(tmp_path, minilm_dir, modules, files))

  # broken files are errors naming the file (and line)
  shutil.rmtree(tmp_path / "st")
  folder = st_folder(tmp_path, minilm_dir, "TPN")
  (tmp_path / "st" / "modules.json").write_text('[\n  {"idx": 0,\n')
  with pytest.raises(ValueError, match=r"st/modules.json:3: invalid JSON"):
    Encoder.from_pretrained(folder)
  (tmp_path / "st" / "modules.json").unlink()
  (tmp_path / "st" / "scalingnote_tower.json").write_text('{"pooling": "mean", "poling": "cls"}')
  with pytest.raises(ValueError, match=r"st/scalingnote_tower.json: unknown field\(s\) \['poling'\]"):
    Encoder.from_pretrained(folder)


@pytest.mark.parametrize("which", ["decoder", "bert"])
def test_a_tower_exported_as_a_folder_reads_back_as_the_same_encoder(tmp_path, which, decoder, minilm_dir):
  """save_folder (export-hf) writes HF config + safetensors through the import table in reverse, the tokenizer
  (EOS moved into its template), the sentence-transformers modules and the exact tower settings:
  `Encoder.from_pretrained` of the folder encodes exactly as the tower did."""
  from scalingnote_jax.models import load_backbone
  from scalingnote_jax.models.st_folder import save_folder

  if which == "decoder":  # last-token pooling on an appended EOS, a title slot in the document prompt, projection
    tower = Tower.create(decoder.tower.backbone.cfg, TowerConfig(
        pooling="last", append_eos=True, max_length=24, query_prompt="Query: {text}",
        document_prompt="Title: {title}\nContent: {text}", projection_dim=8, projection_bias=True),
        nnx.Rngs(3))
    enc = Encoder(tower, decoder.tokenizer)
  else:  # MiniLM's first two layers with a projection, not normalised
    backbone, _ = load_backbone(minilm_dir, num_layers=2)
    enc = Encoder(Tower(backbone, TowerConfig.default_for(backbone.cfg, minilm_dir, projection_dim=16,
                                                         normalize=False), rngs=nnx.Rngs(1)),
                  Tokenizer.from_pretrained(minilm_dir))
  rng = np.random.default_rng(0)
  for var in (enc.tower.projection.kernel, enc.tower.projection.bias):
    if var is not None:
      var[...] = rng.normal(0, 0.1, var.shape).astype(np.float32)
  save_folder(enc.tower, enc.tokenizer, str(tmp_path))
  back = Encoder.from_pretrained(str(tmp_path))
  docs = [{"title": "A title", "text": t} for t in texts(6)] + texts(3, seed=1)
  long = [" ".join(["retrieval"] * 60)]  # truncated: the EOS (when appended) still ends it
  for a, b in ((enc.encode_queries(texts(7) + long), back.encode_queries(texts(7) + long)),
               (enc.encode_documents(docs), back.encode_documents(docs))):
    np.testing.assert_allclose(b, a, atol=1e-6)
  if which == "decoder":  # the EOS is in the exported tokenizer's template, not appended twice
    ids = back.tokenize(back.query_texts(["x"]))[0]
    assert ids == enc.tokenize(enc.query_texts(["x"]))[0] and ids[-1] == enc.tokenizer.eos_id
