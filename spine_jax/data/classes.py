"""The CT classifier's classes, in index order; data, models, metrics and reports all use these."""

QUALITY_CLASSES = ('normal', 'blastic', 'mixed', 'lytic')
POSTEROLATERAL_CLASSES = ('none', 'unilateral', 'bilateral')
