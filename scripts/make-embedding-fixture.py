#!/usr/bin/env python3
"""Writes crates/freshindex-engine/tests/fixtures/minilm-reference.json: reference vectors of
sentence-transformers/all-MiniLM-L6-v2 computed by the reference implementation
(sentence-transformers on PyTorch) for a few varied sentences, against which
tests/local_model.rs checks the engine's local-model embedder.

Run once by hand, not by CI (it needs torch and sentence-transformers):

    python3 -m venv /tmp/st-venv && /tmp/st-venv/bin/pip install sentence-transformers
    /tmp/st-venv/bin/python scripts/make-embedding-fixture.py [MODEL_DIR]

MODEL_DIR is the model folder (default: $FRESHINDEX_TEST_MINILM, see scripts/fetch-test-model).
"""
import json
import os
import sys

from sentence_transformers import SentenceTransformer

LONG = " ".join(
    f"Paragraph {i}: the indexer walks the folder, splits every file into chunks, "
    f"and embeds each chunk once, keyed by the hash of its text."
    for i in range(20)
)

SENTENCES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "How do I rebuild the vector index after changing the embedding model?",
    "a",
    "",
    "Das Wetter ist heute schön, aber morgen soll es regnen.",
    "東京は日本の首都です。",
    "Émile a mangé une crème brûlée à Noël — très bien!",
    "fn main() { let v: Vec<u32> = (0..10).map(|x| x * x).collect(); println!(\"{v:?}\"); }",
    "SELECT id, name FROM users WHERE created_at > NOW() - INTERVAL '7 days' ORDER BY id;",
    "🙂 emoji and    irregular   spacing\tand\ttabs\nand newlines",
    LONG,
]


def main():
    model_dir = sys.argv[1] if len(sys.argv) > 1 else os.environ["FRESHINDEX_TEST_MINILM"]
    model = SentenceTransformer(model_dir, device="cpu")
    vectors = model.encode(SENTENCES, batch_size=4, convert_to_numpy=True)
    n_tokens = [len(model.tokenizer(s)["input_ids"]) for s in SENTENCES]
    out = {
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "produced_by": "scripts/make-embedding-fixture.py (sentence-transformers)",
        "max_seq_length": model.max_seq_length,
        "cases": [
            {
                "text": s,
                "tokens_untruncated": n,
                "vector": [float(f"{x:.7g}") for x in v.tolist()],
            }
            for s, n, v in zip(SENTENCES, n_tokens, vectors)
        ],
    }
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, "..", "crates", "freshindex-engine", "tests", "fixtures",
                        "minilm-reference.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {os.path.normpath(path)}: {len(SENTENCES)} sentences, tokens {n_tokens}")


if __name__ == "__main__":
    main()
