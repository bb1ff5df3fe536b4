# Plot of scripts/bench.py --guests 1,2,4,8: saving and steady dedup CPU
# against the number of guests, one line a configuration.
# gnuplot -e "files='scaling-a.csv scaling-b.csv'; titles=\"'A' 'B'\"; out='x.png'; n=2; workload='busy'; sizes='1: 256/128 MiB'; maxg=8" bench-scaling.gnuplot
# CSV columns (header line): config,guests,saved_mib,saved_pss_mib,steady_cpu_pct,...
set datafile separator ','
set terminal pngcairo size 1200,1200 font 'sans,11'
set output out
set multiplot layout 3,1 title sprintf("mem-share bench: saving (vs mode=off) and steady dedup CPU against the number of TCG guests, %s workload\nRAM/fill per guest (MiB) at each count: %s", workload, sizes)
set grid
set key top left
set xlabel 'guests'
set logscale x 2
set xrange [0.8:maxg * 1.25]
set xtics (1, 2, 4, 8, 16, 32)
set ylabel 'saved MiB (host figure)'
plot for [i=1:n] word(files, i) skip 1 using 2:3 with linespoints pt 7 ps 1 lw 2 title word(titles, i)
set ylabel 'saved MiB (Pss)'
plot for [i=1:n] word(files, i) skip 1 using 2:4 with linespoints pt 7 ps 1 lw 2 title word(titles, i)
set ylabel 'steady dedup CPU (% of a CPU)'
set yrange [0:*]
plot for [i=1:n] word(files, i) skip 1 using 2:5 with linespoints pt 7 ps 1 lw 2 title word(titles, i)
unset multiplot
