"""Online and iterative training: the policy's own samples, judged (:mod:`mmpref.judges`), grouped
(:mod:`mmpref.online.builders`) and served to the engine in the offline layout (:mod:`mmpref.online.source`)."""
