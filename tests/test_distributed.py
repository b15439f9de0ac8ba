"""Multi-process start-up refuses an incomplete or malformed launch environment, naming the variables."""

import pytest

from scalingnote_jax import distributed


@pytest.mark.parametrize("environ, message", [
    ({"SCALINGNOTE_COORDINATOR": "127.0.0.1:1234", "SCALINGNOTE_NUM_PROCESSES": "2"},
     "SCALINGNOTE_COORDINATOR, SCALINGNOTE_NUM_PROCESSES set but SCALINGNOTE_PROCESS_ID missing"),
    ({"SCALINGNOTE_COORDINATOR": "127.0.0.1:1234", "SCALINGNOTE_NUM_PROCESSES": "two",
      "SCALINGNOTE_PROCESS_ID": "0"}, "SCALINGNOTE_NUM_PROCESSES='two': expected an integer"),
    ({"SCALINGNOTE_DISTRIBUTED": "yes"}, "SCALINGNOTE_DISTRIBUTED='yes': expected 'auto'"),
])
def test_bad_launch_environment_is_refused(environ, message):
  with pytest.raises(ValueError, match=message):
    distributed.initialize(environ)


def test_no_launch_environment_is_one_process():
  distributed.initialize({})  # nothing to start: stays a single process
  assert distributed.is_main()
