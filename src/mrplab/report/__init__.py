"""Reports of a theory run: the run folder (run_folder.py) and its figures (figures.py).

``run_theory(cfg, out_dir)`` runs one experiment and writes its folder;
``write_run(result, out_dir)`` writes the folder of a result computed elsewhere.
"""

from mrplab.report.run_folder import RunFolder, run_theory, write_run

__all__ = ["RunFolder", "run_theory", "write_run"]
