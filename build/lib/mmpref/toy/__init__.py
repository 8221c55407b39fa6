"""Tiny models and data built from configs, for tests, tiny configs, examples, benchmarks and the demo (the role
``transformers.testing_utils`` plays there): nothing here downloads anything.

- :mod:`mmpref.toy.llm`: a tiny Llama, a locally trained tokenizer and synthetic preference pairs;
- :mod:`mmpref.toy.clap`: a tiny random CLAP (``preset:tiny`` scorers);
- :mod:`mmpref.toy.tones`: a tiny audio preference set of tones (``data.path: tiny:N[:K]``).

The tiny Tango pipeline is a preset of :mod:`mmpref.models.tango.presets` (``model.pipeline: tiny``).
"""
