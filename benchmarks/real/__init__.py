"""The real-model benchmark (``m2kt bench real``): pretrained encoders on both sides, Debian text.

``data`` (package descriptions by section, seeded splits), ``models`` (MiniLM; mpnet assembled from
its five part packages), ``words`` (the word-list anchors of the N=0 route), ``classifiers`` (the
baselines' nearest centroid and logistic regression), ``experiment`` (one direction: every condition),
``report`` (table, plot, targets), ``run`` (the command).
"""
