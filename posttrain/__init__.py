"""The commands above the stages: the `posttrain` CLI, the teacher's materialisation,
the plots and the summary. They import the stages' modules and the shared ground
(`pipeline`); nothing below imports them."""
