"""Looking at runs: ``results.py`` loads them (metrics, archives, robustness),
``show.py`` prints and plots them (``dqd-ray show``), ``viz.py`` draws heatmaps
and curves."""
