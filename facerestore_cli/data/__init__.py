"""Data for training and evaluation: crops, degradations, test sets and preference pairs.

crops        aligned training crops from photos (`prepare-data`) and their dataset
degrade      the blind face degradation, batched in torch
testsets     rebuildable degraded test sets (`degrade`) and finding their images
annotations  preference pairs (human, automatic, SVM) in one format
autopairs    automatic pairs: ground truth > restored > degraded, milder > stronger
svm          the SVM labeller trained on human labels
labelling/   the local page that shows two faces and records the better one
"""
