<?php
// S1 short-lived publisher for php-amqplib: N cycles of connect, channel, publish one 100-byte
// message, close channel, close connection. Prints one JSON line: per-cycle milliseconds.
// usage: php s1_publish.php HOST PORT USER PASS VHOST QUEUE N ID_BASE [BUDGET_MS [CAFILE]]
// Stops after N cycles, or once BUDGET_MS (0 = none) have passed and at least 5 cycles ran.
// With CAFILE the connection is TLS (AMQPSSLConnection, peer verified as "localhost").
declare(strict_types=1);

$autoload = getenv('PHPAMQPLIB_AUTOLOAD') ?: '/usr/share/php/PhpAmqpLib/autoload.php';
require_once $autoload;

use PhpAmqpLib\Connection\AMQPSSLConnection;
use PhpAmqpLib\Connection\AMQPStreamConnection;
use PhpAmqpLib\Message\AMQPMessage;

[$_, $host, $port, $user, $pass, $vhost, $queue, $n, $idBase] = array_slice($argv, 0, 9);
$budgetMs = (float)($argv[9] ?? 0);
$cafile = $argv[10] ?? '';
$n = (int)$n;
$idBase = (int)$idBase;
$times = [];
$start = hrtime(true);
for ($i = 0; $i < $n; $i++) {
    if ($budgetMs > 0 && $i > 4 && (hrtime(true) - $start) / 1e6 > $budgetMs) {
        break;
    }
    $body = sprintf('%020d', $idBase + $i) . str_repeat('x', 80);
    $t0 = hrtime(true);
    if ($cafile !== '') {
        $conn = new AMQPSSLConnection($host, (int)$port, $user, $pass, $vhost, [
            'cafile' => $cafile,
            'verify_peer' => true,
            'verify_peer_name' => true,
            'peer_name' => 'localhost',
        ]);
    } else {
        $conn = new AMQPStreamConnection($host, (int)$port, $user, $pass, $vhost);
    }
    $ch = $conn->channel();
    $ch->basic_publish(new AMQPMessage($body), '', $queue);
    $ch->close();
    $conn->close();
    $times[] = (hrtime(true) - $t0) / 1e6;
}
echo json_encode($times), "\n";
