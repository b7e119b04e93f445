"""Models and tokenizers: loading them with errors that say what went wrong (:mod:`rh_trl.models.loading`), and the
tiny offline models users can name (``rh_trl:tiny-rm``, …; :mod:`rh_trl.models.offline`)."""
