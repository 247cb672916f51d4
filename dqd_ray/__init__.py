"""dqd-ray."""

from dqd_ray import _pyribs

# The coordinator imports pyribs, which imports torch only to learn whether it
# is installed: see dqd_ray._pyribs.
_pyribs.install()
