"""Privacy audits: membership inference against a trained model (:mod:`.membership`: scores, ROC
summaries, the differential-privacy epsilon an attack's success proves) and the shadow models LiRA
compares with (:mod:`.shadows`)."""
