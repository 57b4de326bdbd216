"""`raises_naming`: checks an error by the named things its message holds (the config key, the
file, the record, the offending value), not by its wording, so rewording a message breaks no test.

Import from test modules as `from naming import raises_naming` (pytest puts tests/ on sys.path).
"""
import contextlib

import pytest


@contextlib.contextmanager
def raises_naming(exc, *names):
  """`pytest.raises(exc)` whose exception's message also contains each of `names`.

  Names are plain substrings (non-strings are `str()`-ed), not regexes: a test reads
  `with raises_naming(ValueError, "model.n_kv_head", "7"):`. Yields pytest's `ExceptionInfo`.
  """
  with pytest.raises(exc) as info:
    yield info
  message = str(info.value)
  missing = [str(n) for n in names if str(n) not in message]
  assert not missing, f"{info.typename} does not name {missing}: {message}"
