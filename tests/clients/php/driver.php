<?php
// php-amqplib driver for the amqproxy client tests (Debian php-amqplib, /usr/share/php).
//   php driver.php COMMAND '{"host":..., "port":..., "user":..., "password":..., "vhost":..., ...}'
// Prints one JSON line with what it observed; exits non-zero on an unexpected error.
// php-amqplib logs in with AMQPLAIN by default; "login" => "PLAIN" switches.

declare(strict_types=1);

require_once '/usr/share/php/PhpAmqpLib/autoload.php';

use PhpAmqpLib\Connection\AMQPSSLConnection;
use PhpAmqpLib\Connection\AMQPStreamConnection;
use PhpAmqpLib\Exception\AMQPBasicCancelException;
use PhpAmqpLib\Exception\AMQPProtocolChannelException;
use PhpAmqpLib\Exception\AMQPTimeoutException;
use PhpAmqpLib\Message\AMQPMessage;
use PhpAmqpLib\Wire\AMQPAbstractCollection as C;
use PhpAmqpLib\Wire\AMQPArray;
use PhpAmqpLib\Wire\AMQPDecimal;
use PhpAmqpLib\Wire\AMQPTable;

$command = $argv[1] ?? '';
$args = json_decode($argv[2] ?? '{}', true);

// "tls" => {"cafile", "peer_name", optional "cert" and "key"}: amqps, the server's certificate
// verified against cafile and peer_name, a client certificate when given.
function connect(array $args): AMQPStreamConnection
{
    $tls = $args['tls'] ?? null;
    if ($tls !== null) {
        $ssl = ['cafile' => $tls['cafile'], 'verify_peer' => true, 'verify_peer_name' => true,
                'peer_name' => $tls['peer_name']];
        if (isset($tls['cert'])) {
            $ssl['local_cert'] = $tls['cert'];
            $ssl['local_pk'] = $tls['key'];
        }
        return new AMQPSSLConnection(
            $args['host'], $args['port'], $args['user'], $args['password'], $args['vhost'], $ssl,
            ['login_method' => $args['login'] ?? 'AMQPLAIN', 'connection_timeout' => 10.0,
             'read_write_timeout' => 10.0]
        );
    }
    return new AMQPStreamConnection(
        $args['host'], $args['port'], $args['user'], $args['password'], $args['vhost'],
        false, $args['login'] ?? 'AMQPLAIN', null, 'en_US', 10.0, 10.0, null, false, 0
    );
}

const TAGS = [
    C::T_INT_SHORTSHORT => 'b', C::T_INT_SHORTSHORT_U => 'B', C::T_INT_SHORT => 's',
    C::T_INT_SHORT_U => 'u', C::T_INT_LONG => 'I', C::T_INT_LONG_U => 'i',
    C::T_INT_LONGLONG => 'l', C::T_INT_LONGLONG_U => 'L', C::T_DECIMAL => 'D',
    C::T_TIMESTAMP => 'T', C::T_VOID => 'V', C::T_BOOL => 't', C::T_STRING_SHORT => 'ss',
    C::T_STRING_LONG => 'S', C::T_ARRAY => 'A', C::T_TABLE => 'F', C::T_BYTES => 'x',
    C::T_FLOAT => 'f', C::T_DOUBLE => 'd',
];

// [tag, value] as php-amqplib decoded it; nested collections recursively; bytes as hex
function typed($coll)
{
    $out = [];
    foreach ($coll as $k => $pair) {
        [$type, $v] = $pair;
        $tag = TAGS[$type];
        if ($v instanceof C) {
            $v = typed($v);
        } elseif ($v instanceof AMQPDecimal) {
            $v = [$v->getE(), $v->getN()];
        } elseif ($tag === 'x') {
            $v = bin2hex($v);
        }
        $out[$k] = [$tag, $v];
    }
    return $coll instanceof AMQPArray ? array_values($out) : (object) $out;
}

function props(AMQPMessage $m): array
{
    $p = $m->get_properties();
    if (isset($p['application_headers'])) {
        $p['application_headers'] = typed($p['application_headers']);
    }
    return $p;
}

function body_of(int $size, int $seed): string
{
    $block = '';
    for ($i = 0; $i < 251; $i++) {
        $block .= chr(($i * 7 + $seed) & 0xff);
    }
    return substr(str_repeat($block, intdiv($size, 251) + 1), 0, $size);
}

function drain_until($ch, callable $done, float $timeout = 5.0): void
{
    $deadline = microtime(true) + $timeout;
    while (!$done()) {
        $left = $deadline - microtime(true);
        if ($left <= 0) {
            throw new RuntimeException('timed out waiting for deliveries');
        }
        try {
            $ch->wait(null, false, min($left, 0.2));
        } catch (AMQPTimeoutException $e) {
        }
    }
}

function quiet($ch, float $seconds = 0.2): void
{
    try {
        $ch->wait(null, false, $seconds);
    } catch (AMQPTimeoutException $e) {
    }
}

$commands = [];

// Connect and close; a refusal is reported, not thrown.
$commands['login'] = function (array $a): array {
    try {
        $conn = connect($a);
        $conn->close();
        return ['ok' => true];
    } catch (Throwable $e) {
        return ['ok' => false, 'error' => get_class($e) . ': ' . $e->getMessage()];
    }
};

// One publish per process (PHP-FPM style): connect, publish, close.
$commands['publish_one'] = function (array $a): array {
    $conn = connect($a);
    $ch = $conn->channel();
    $ch->basic_publish(new AMQPMessage($a['body'], ['delivery_mode' => 2]), '', $a['q']);
    $ch->close();
    $conn->close();
    return ['ok' => true];
};

// Publish-and-close cycles for `seconds` (no confirms, as a PHP-FPM worker does): which
// bodies were handed over (Connection.CloseOk received) and which cycles failed, and how.
$commands['publish_loop'] = function (array $a): array {
    $ok = [];
    $errors = [];
    $deadline = microtime(true) + (float)$a['seconds'];
    for ($i = 0; microtime(true) < $deadline; $i++) {
        $body = $a['prefix'] . '-' . $i;
        try {
            $conn = connect($a);
            $ch = $conn->channel();
            $ch->basic_publish(new AMQPMessage($body), '', $a['q']);
            $ch->close();
            $conn->close();
            $ok[] = $body;
        } catch (Throwable $e) {
            $errors[] = [$body, get_class($e) . ': ' . $e->getMessage()];
            usleep(10000);
        }
    }
    return ['ok' => $ok, 'errors' => $errors];
};

$commands['props'] = function (array $a): array {
    $conn = connect($a);
    $ch = $conn->channel();
    $got = $ch->basic_get($a['q_in'], true);
    $delivered = null;
    $ch->basic_consume($a['q_in'], '', false, true, false, false,
        function (AMQPMessage $m) use (&$delivered) { $delivered = $m; });
    drain_until($ch, function () use (&$delivered) { return $delivered !== null; });
    $h = new AMQPTable();
    $h->set('str', "ph\u{00e9}", C::T_STRING_LONG);
    $h->set('i8', -5, C::T_INT_SHORTSHORT);
    $h->set('i16', -300, C::T_INT_SHORT);
    $h->set('i32', -70000, C::T_INT_LONG);
    $h->set('i64', -5000000000, C::T_INT_LONGLONG);
    $h->set('auto', 70000);
    // php-amqplib cannot write floats at all (AMQPWriter: 'Unsupported type "18"/"19"' for
    // T_FLOAT/T_DOUBLE); it reads them, which the reference message covers
    $h->set('dec', new AMQPDecimal(12345, 2), C::T_DECIMAL);
    $h->set('ts', 1700000000, C::T_TIMESTAMP);
    $h->set('yes', true, C::T_BOOL);
    $h->set('no', false);
    $h->set('bytes', "\x00\x01\xfe\xff", C::T_BYTES);
    $h->set('void', null, C::T_VOID);
    $h->set('table', new AMQPTable(['k' => 'v', 'inner' => new AMQPTable(['deep' => true])]));
    $h->set('array', new AMQPArray(['a', 1, new AMQPArray([true])]));
    $ch->basic_publish(new AMQPMessage('out', [
        'content_type' => 'text/plain', 'content_encoding' => 'utf-8', 'application_headers' => $h,
        'delivery_mode' => 2, 'priority' => 6, 'correlation_id' => 'c', 'reply_to' => 'r',
        'expiration' => '20000', 'message_id' => 'm', 'timestamp' => 1700000000, 'type' => 't',
        'user_id' => $a['user'], 'app_id' => 'php',
    ]), '', $a['q_out']);
    $ch->close();
    $conn->close();
    return [
        'get' => ['body' => $got->getBody(), 'properties' => props($got)],
        'deliver' => ['body' => $delivered->getBody(), 'properties' => props($delivered)],
    ];
};

// Confirms, mandatory return, tx, qos/ack/nack/reject/recover/cancel.
$commands['features'] = function (array $a): array {
    $conn = connect($a);
    $out = [];
    $ch = $conn->channel();
    $ch->confirm_select();
    $acks = 0;
    $nacks = 0;
    $returns = [];
    $ch->set_ack_handler(function () use (&$acks) { $acks++; });
    $ch->set_nack_handler(function () use (&$nacks) { $nacks++; });
    $ch->set_return_listener(function ($code, $text, $exchange, $rk, AMQPMessage $m) use (&$returns) {
        $returns[] = [$code, $text, $exchange, $rk, $m->getBody(), $m->get('message_id')];
    });
    for ($i = 0; $i < 20; $i++) {
        $ch->basic_publish(new AMQPMessage("c$i"), '', $a['q'], true);
    }
    $ch->basic_publish(new AMQPMessage('lost', ['message_id' => 'r1']), 'amq.direct', 'nowhere', true);
    $ch->wait_for_pending_acks_returns(10.0);
    $out['acks'] = $acks;
    $out['nacks'] = $nacks;
    $out['returns'] = $returns;

    $tx = $conn->channel();
    $tx->tx_select();
    $tx->basic_publish(new AMQPMessage('rolled-back'), '', $a['q']);
    $tx->tx_rollback();
    $tx->basic_publish(new AMQPMessage('committed'), '', $a['q']);
    $tx->tx_commit();
    [, $out['countAfterCommit'],] = $tx->queue_declare($a['q'], true);

    $c = $conn->channel();
    for ($i = 0; $i < 6; $i++) {
        $c->basic_publish(new AMQPMessage("m$i"), '', $a['q2']);
    }
    $c->basic_qos(0, 2, false);
    $got = [];
    $tag = $c->basic_consume($a['q2'], '', false, false, false, false,
        function (AMQPMessage $m) use (&$got) { $got[] = $m; });
    $take = function (int $n, float $wait = 5.0) use ($c, &$got) {
        try {
            drain_until($c, function () use (&$got, $n) { return count($got) >= $n; }, $wait);
        } catch (RuntimeException $e) {
        }
        quiet($c, 0.2);
        return count($got);
    };
    $steps = [];
    $steps[] = $take(2);
    $got[0]->ack();
    $steps[] = $take(3);
    $got[1]->nack(true);
    $steps[] = $take(4);
    $out['nackRedelivered'] = [$got[3]->getBody(), $got[3]->isRedelivered()];
    $got[2]->reject(false);
    $steps[] = $take(5);
    $c->basic_recover(true);
    $steps[] = $take(7);
    $out['recovered'] = [[$got[5]->getBody(), $got[5]->isRedelivered()],
                         [$got[6]->getBody(), $got[6]->isRedelivered()]];
    $got[6]->ack(true);
    $steps[] = $take(9);
    $c->basic_cancel($tag);
    $c->basic_publish(new AMQPMessage('m6'), '', $a['q2']);
    $steps[] = $take(10, 0.3);
    $got[8]->nack(true, true);
    $out['steps'] = $steps;
    $out['order'] = array_map(function ($m) { return $m->getBody(); }, $got);
    $c->close();
    $conn->close();
    return $out;
};

$commands['bodies'] = function (array $a): array {
    $conn = connect($a);
    $ch = $conn->channel();
    $ch->confirm_select();
    foreach ([0, 1] as $copy) {
        foreach ($a['sizes'] as $i => $size) {
            $ch->basic_publish(new AMQPMessage(body_of($size, $i)), '', $a['q']);
        }
    }
    $ch->wait_for_pending_acks(30.0);
    $out = ['get' => [], 'deliver' => []];
    foreach ($a['sizes'] as $i => $size) {
        $m = $ch->basic_get($a['q'], true);
        $out['get'][] = $m ? [strlen($m->getBody()), hash('sha256', $m->getBody())] : null;
    }
    $ch->basic_consume($a['q'], '', false, true, false, false,
        function (AMQPMessage $m) use (&$out) {
            $out['deliver'][] = [strlen($m->getBody()), hash('sha256', $m->getBody())];
        });
    drain_until($ch, function () use (&$out, $a) {
        return count($out['deliver']) >= count($a['sizes']);
    }, 30.0);
    $ch->close();
    $conn->close();
    return $out;
};

// Exchanges, direct reply-to, broker cancel, user_id, channel numbers.
$commands['routing'] = function (array $a): array {
    $conn = connect($a);
    $out = [];
    $ch = $conn->channel(2047);
    $out['channelId'] = $ch->getChannelId();
    $t = "t-{$a['tag']}";
    $f = "f-{$a['tag']}";
    $h = "h-{$a['tag']}";
    $ch->exchange_declare($t, 'topic', false, false, true);
    $ch->exchange_declare($f, 'fanout', false, false, true);
    $ch->exchange_declare($h, 'headers', false, false, true);
    $ch->queue_bind($a['q_topic'], $t, '#.end');
    $ch->queue_bind($a['q_fan'], $f);
    $ch->queue_bind($a['q_hdr'], $h, '', false, new AMQPTable(['x-match' => 'any', 'a' => 'x']));
    $ch->exchange_bind($f, $t, 'fan.*');
    $ch->confirm_select();
    $ch->basic_publish(new AMQPMessage('one.end'), $t, 'one.end');
    $ch->basic_publish(new AMQPMessage('one.two'), $t, 'one.two');
    $ch->basic_publish(new AMQPMessage('fan.x'), $t, 'fan.x');
    $ch->basic_publish(new AMQPMessage('hx', ['application_headers' => new AMQPTable(['a' => 'x'])]), $h, '');
    $ch->basic_publish(new AMQPMessage('hy', ['application_headers' => new AMQPTable(['a' => 'y'])]), $h, '');
    $ch->wait_for_pending_acks(10.0);
    $ch->exchange_unbind($f, $t, 'fan.*');

    // direct reply-to RPC, server on its own connection
    $sconn = connect($a);
    $sch = $sconn->channel();
    $sch->basic_consume($a['rpc_q'], '', false, false, false, false, function (AMQPMessage $m) use ($sch) {
        $sch->basic_publish(new AMQPMessage(strrev($m->getBody()),
            ['correlation_id' => $m->get('correlation_id')]), '', $m->get('reply_to'));
        $m->ack();
    });
    $rch = $conn->channel(3);
    $reply = null;
    $rch->basic_consume('amq.rabbitmq.reply-to', '', false, true, false, false,
        function (AMQPMessage $m) use (&$reply) { $reply = [$m->getBody(), $m->get('correlation_id')]; });
    $rch->basic_publish(new AMQPMessage('php-rpc', ['reply_to' => 'amq.rabbitmq.reply-to',
        'correlation_id' => 'id-9']), '', $a['rpc_q']);
    $deadline = microtime(true) + 5;
    while ($reply === null && microtime(true) < $deadline) {
        quiet($sch, 0.05);
        quiet($rch, 0.05);
    }
    $out['rpc'] = $reply;
    $sconn->close();

    // broker-initiated cancel (php-amqplib advertises consumer_cancel_notify)
    $cch = $conn->channel(1234);
    $ctag = $cch->basic_consume($a['doomed'], '', false, true, false, false, function () {});
    $rch->queue_delete($a['doomed']);
    try {
        drain_until($cch, function () { return false; }, 5.0);
        $out['cancel'] = 'none';
    } catch (AMQPBasicCancelException $e) {
        $out['cancel'] = $e->getConsumerTag() === $ctag ? 'cancelled' : 'other tag';
    } catch (RuntimeException $e) {
        $out['cancel'] = 'timeout';
    }
    $out['cancelChannelOpen'] = $cch->is_open();

    // forged user_id: 406 on that channel only
    $bad = $conn->channel(77);
    $bad->confirm_select();
    try {
        $bad->basic_publish(new AMQPMessage('forged', ['user_id' => 'mallory']), '', $a['q_fan']);
        $bad->wait_for_pending_acks(5.0);
        $out['userIdError'] = null;
    } catch (AMQPProtocolChannelException $e) {
        $out['userIdError'] = [$e->getCode(), $e->getMessage()];
    }
    foreach ([2, 500, 2046] as $id) {
        $c = $conn->channel($id);
        $c->basic_publish(new AMQPMessage("ch-$id"), '', $a['q_ids']);
        $out['channels'][] = $c->getChannelId();
        $c->close();
    }
    $ch->basic_publish(new AMQPMessage('after'), '', $a['q_fan']);
    $ch->wait_for_pending_acks(5.0);
    $out['connectionAlive'] = $conn->isConnected();
    $conn->close();
    return $out;
};

try {
    if (!isset($commands[$command])) {
        throw new InvalidArgumentException("unknown command $command");
    }
    $result = $commands[$command]($args);
    echo json_encode($result, JSON_UNESCAPED_UNICODE | JSON_PRESERVE_ZERO_FRACTION | JSON_THROW_ON_ERROR), "\n";
    exit(0);
} catch (Throwable $e) {
    fwrite(STDERR, get_class($e) . ': ' . $e->getMessage() . "\n" . $e->getTraceAsString() . "\n");
    exit(1);
}
