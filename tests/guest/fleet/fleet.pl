#!/usr/bin/perl
# The perl service of the fleet guest (tests/guest/fleet/init).
#
# Holds one hash in memory for as long as the guest runs:
#   "big%05d"   => 128 KiB strings (half of the data; each its own mmap)
#   "small%07d" => 192-byte strings (the other half: many small values)
# Every value is a slice of a 1 MiB pool of pseudo-random bytes (perl's
# own generator, deterministic for a given srand): the pool of the fixed
# key SHARED_KEY for entries in the first `shared` percent, the pool of the
# guest's seed for the others.  Big values start at offsets that differ
# modulo 4 KiB, so no two of them hold the same page.
#
# Commands on the FIFO DIR/perl.in (opened read-write: no EOF), one a line:
#   verify   rebuild every value from the pools, compare; the result goes
#            to DIR/perl.result ("ok ..." or "bad=N first=KEY ...")
#   corrupt  the verifier's self-test: flip one byte of the last big value
#            (written to DIR/perl.corrupted)
#
#   fleet.pl SEED MIB SHARED DIR INTERVAL
use strict;
use warnings;
use Time::HiRes qw(time);

use constant SHARED_KEY => 0x5EED5EED;
use constant POOL => 1 << 20;
use constant BIG => 128 << 10;
use constant SMALL => 192;
use constant SMALL_COST => 256;     # about what one small entry costs

my ($seed, $mib, $shared, $dir, $interval) = @ARGV;
my $t0 = time;

sub pool {
    my ($key) = @_;
    srand($key);
    return pack("N*", map { int(rand(4294967296)) } 1 .. (POOL + BIG) / 4);
}

my %pools = (SHARED_KEY, pool(SHARED_KEY));
$pools{$seed} = pool($seed) unless $seed == SHARED_KEY;

my $total = $mib << 20;
my $nbig = int($total / 2 / BIG) || 1;
my $nsmall = int(($total - $nbig * BIG) / SMALL_COST) || 1;
my $bshared = int($nbig * $shared / 100);
my $sshared = int($nsmall * $shared / 100);

sub big_value {
    my ($i) = @_;
    my $key = $i < $bshared ? SHARED_KEY : $seed;
    return substr($pools{$key}, ($i * 8191) % (POOL - BIG), BIG);
}

sub small_value {
    my ($j) = @_;
    my $key = $j < $sshared ? SHARED_KEY : $seed;
    return substr($pools{$key}, ($j * 197) % (POOL - SMALL), SMALL);
}

my %h;
$h{sprintf("big%05d", $_)} = big_value($_) for 0 .. $nbig - 1;
$h{sprintf("small%07d", $_)} = small_value($_) for 0 .. $nsmall - 1;

sub write_result {
    my ($path, $text) = @_;
    open(my $f, ">", "$path.tmp") or die "$path.tmp: $!";
    print $f "$text\n";
    close($f) or die "$path.tmp: $!";
    rename("$path.tmp", $path) or die "$path: $!";
}

open(my $in, "+<", "$dir/perl.in") or die "$dir/perl.in: $!";
write_result("$dir/perl.ready", sprintf("big=%d shared=%d small=%d shared=%d "
             . "mib=%.1f s=%.1f", $nbig, $bshared, $nsmall, $sshared,
             ($nbig * BIG + $nsmall * SMALL_COST) / (1 << 20), time - $t0));
$| = 1;

my $tick = 0;
my $buf = "";
while (1) {
    my $rin = "";
    vec($rin, fileno($in), 1) = 1;
    my $n = select(my $rout = $rin, undef, undef, $interval);
    if ($n <= 0) {
        # A few requests: look entries up, as a service would.
        $tick++;
        my $sum = 0;
        for my $k (0 .. 15) {
            my $j = (($tick * 16 + $k) * 13) % $nsmall;
            $sum += ord(substr($h{sprintf("small%07d", $j)}, $k, 1));
            $sum += length($h{sprintf("big%05d", ($tick * 16 + $k) % $nbig)});
        }
        next;
    }
    sysread($in, $buf, 4096, length $buf) or next;
    while ($buf =~ s/^([^\n]*)\n//) {
        my $cmd = $1;
        $cmd =~ s/^\s+|\s+$//g;
        if ($cmd eq "verify") {
            my $t = time;
            my ($bad, $first) = (0, undef);
            my $want = $nbig + $nsmall;
            if (keys(%h) != $want) {
                $bad += abs(keys(%h) - $want);
                $first //= "keys=" . keys(%h);
            }
            for my $i (0 .. $nbig - 1) {
                my $k = sprintf("big%05d", $i);
                next if defined $h{$k} && $h{$k} eq big_value($i);
                $bad++;
                $first //= $k;
            }
            for my $j (0 .. $nsmall - 1) {
                my $k = sprintf("small%07d", $j);
                next if defined $h{$k} && $h{$k} eq small_value($j);
                $bad++;
                $first //= $k;
            }
            write_result("$dir/perl.result",
                         ($bad ? "bad=$bad first=$first " : "ok ")
                         . sprintf("big=%d small=%d s=%.1f", $nbig, $nsmall, time - $t));
        } elsif ($cmd eq "corrupt") {
            my $k = sprintf("big%05d", $nbig - 1);
            my $pos = BIG / 2;
            substr($h{$k}, $pos, 1) = chr(ord(substr($h{$k}, $pos, 1)) ^ 1);
            write_result("$dir/perl.corrupted", "$k byte=$pos");
        } elsif ($cmd ne "") {
            print "MS-FLEET perl unknown command '$cmd'\n";
        }
    }
}
