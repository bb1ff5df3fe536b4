# Plot of scripts/bench.py: memory saved and host memory used over time.
# gnuplot -e "files='a.csv b.csv'; titles=\"'A' 'B'\"; out='x.png'; ideal=576; n=2; guests=2; workload='busy'" bench.gnuplot
# CSV columns (header line): config,t,t_launch,phase,host_used_mib,saved_mib,pss_mib,...
# ideal=0: no ideal line (a workload without one)
if (!exists("guests")) guests = 2
if (!exists("workload")) workload = 'idle'
set datafile separator ','
set terminal pngcairo size 1200,900 font 'sans,11'
set output out
set multiplot layout 2,1 title sprintf('mem-share bench: %d TCG guest%s per configuration, %s workload (t = 0: all workloads filled)', guests, guests == 1 ? '' : 's', workload)
set grid
set key bottom right
set xlabel 'seconds after fill'
set ylabel 'memory saved (MiB, vs mode=off)'
set xrange [-5:*]
plot for [i=1:n] word(files, i) skip 1 using 2:6 with linespoints pt 7 ps 0.5 lw 2 title word(titles, i), \
     (ideal > 0 ? ideal : 1/0) with lines dt 2 lc rgb 'gray40' title 'ideal saving'
set ylabel 'host memory used by the guests (MiB, AnonPages+Shmem delta)'
set key top right
set xrange [*:*]
set xlabel 'seconds after launch'
plot for [i=1:n] word(files, i) skip 1 using 3:5 with lines lw 2 title word(titles, i)
unset multiplot
